"""The tokenizer of an HF folder as GGUF metadata (llama.cpp's ``gpt2`` BPE tokenizer).

Supported: byte-level BPE ``tokenizer.json`` files (SmolLM2, GPT-2 style) whose
pre-tokenizer llama.cpp reproduces: plain byte-level with the GPT-2 regex (``gpt2``) or
individual digits then byte-level (``smollm``). Anything else is refused in one line rather
than written with a pre-tokenizer that would split text differently.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gprune.errors import ConfigError

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4   # gguf.TokenType values


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a ``tokenizer.json`` pre-tokenizer (ConfigError if none fits)."""
    def byte_level(p: dict) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) \
            and not p.get("add_prefix_space", False)

    if pre and byte_level(pre):
        return "gpt-2"
    steps = (pre or {}).get("pretokenizers", [])
    if pre and pre.get("type") == "Sequence" and len(steps) == 2 and \
            steps[0] == {"type": "Digits", "individual_digits": True} and byte_level(steps[1]):
        return "smollm"
    raise ConfigError(f"the tokenizer's pre-tokenizer {json.dumps(pre)} has no llama.cpp "
                      "equivalent gprune knows; supported: byte-level BPE (GPT-2 regex), "
                      "optionally after individual digits (SmolLM)")


def tokenizer_metadata(folder: Path, n_vocab: int) -> dict[str, Any]:
    """Tokens, types, merges, pre-tokenizer and special-token ids for ``gguf``'s writer."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no tokenizer.json; the GGUF export needs a fast "
                          "(tokenizers) BPE tokenizer saved with the checkpoint")
    spec = json.loads(path.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(f"{path} is not a BPE tokenizer; llama.cpp's gpt2 tokenizer is "
                          "the only one gprune's GGUF export writes so far")
    added = spec.get("added_tokens", [])
    tokens, types = _token_table(model["vocab"], added, n_vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    pre = spec.get("pre_tokenizer")
    if not merges:   # e.g. the tiny models' byte tokenizer: one token per byte
        return {"tokens": tokens, "types": types, "merges": [_merge_that_never_applies(added)],
                "pre": "gpt-2", **_special_ids(folder)}
    return {"tokens": tokens, "types": types, "merges": merges,
            "pre": pre_tokenizer_name(pre), **_special_ids(folder)}


def _merge_that_never_applies(added: list[dict]) -> str:
    """llama.cpp requires a merge list and gguf writes no empty array. BPE merges start
    from single characters, so a pair of multi-character added tokens never merges: the
    text splits into the same tokens as with no merges, whatever the pre-tokenizer."""
    long = [t["content"] for t in added if len(t["content"]) > 1 and " " not in t["content"]]
    if not long:
        raise ConfigError("the tokenizer has no BPE merges and no multi-character added "
                          "token; gprune cannot write it for llama.cpp")
    return f"{long[0]} {long[-1]}"


def _token_table(vocab: dict[str, int], added: list[dict],
                 n_vocab: int) -> tuple[list[str], list[int]]:
    if max(vocab.values(), default=-1) >= n_vocab:
        raise ConfigError(f"the tokenizer has ids up to {max(vocab.values())} but the model "
                          f"only {n_vocab} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [USER_DEFINED] * n_vocab
    for text, idx in vocab.items():
        tokens[idx], types[idx] = text, NORMAL
    for tok in added:
        if tok["id"] < n_vocab:
            tokens[tok["id"]] = tok["content"]
            types[tok["id"]] = CONTROL if tok.get("special") else USER_DEFINED
    return tokens, types


def _special_ids(folder: Path) -> dict[str, Any]:
    """bos/eos/unk/pad ids and whether encoding adds bos/eos, as HF does it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("a")["input_ids"]
    special = {name: getattr(tok, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    return {"special": {k: v for k, v in special.items() if v is not None},
            "add_bos": bool(ids) and ids[0] == tok.bos_token_id,
            "add_eos": bool(ids) and ids[-1] == tok.eos_token_id,
            "chat_template": getattr(tok, "chat_template", None)}
