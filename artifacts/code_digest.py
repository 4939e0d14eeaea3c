"""Digest of the code behind each stage, so that an artifact key changes with its code.

A stage's digest covers the source of its task module and of every module of the
project's own packages (``gprune``, ``tasks``, ``artifacts``) that the task imports,
transitively, anywhere in a module (top level or inside functions), plus the parent
packages' ``__init__`` modules that importing them runs, plus the few non-Python files
some modules read (``RESOURCES``). Third-party code is not hashed: the manifest records
library versions instead.

Python sources are normalized before hashing: the hash is of ``ast.dump`` of the parsed
module with docstrings removed, so comments, docstrings, blank lines and formatting do
not change a digest and any code change does (``ast.dump``'s format belongs to the
Python minor version, so a new Python minor version changes every digest once).
``PLUMBING`` modules (how artifacts are stored and keyed, not what they contain) are
neither hashed nor followed.

Everything is found statically (``ast``), never imported, and computed once per process
(``functools.lru_cache``): the digest describes the code the process loaded at first use.
``root`` (a folder holding the package folders) is injectable for tests.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gprune.errors import GpruneError

PACKAGES = ("gprune", "tasks", "artifacts")

# stage name (as given to tasks.base.run_stage) -> the modules its computation starts from
STAGE_ROOTS: dict[str, tuple[str, ...]] = {
    "corpus": ("tasks.corpus",),
    "capture": ("tasks.capture",),
    "gram": ("tasks.gram",),
    "contexts": ("tasks.contexts",),
    "stats": ("tasks.stats",),
    "partition": ("tasks.partition",),
    "score": ("tasks.score",),
    "path": ("tasks.path",),
    "allocate": ("tasks.allocate",),
    "surgery": ("tasks.surgery",),
    "perplexity": ("tasks.perplexity",),
    "choice": ("tasks.choice",),
    "speed": ("tasks.speed",),
    "export": ("tasks.export",),
    "report": ("tasks.report",),
    "neurons": ("tasks.neurons",),
    "attribution": ("tasks.attribution",),
}

# non-Python files a module reads, as globs relative to the module's folder
RESOURCES: dict[str, tuple[str, ...]] = {
    "gprune.maths.native": ("capture_kernels.c",),
    "gprune.models.pruned": ("templates/*.tmpl",),
}

# storage and keying machinery: changing it must not invalidate every artifact
PLUMBING = frozenset({"artifacts.store", "artifacts.code_digest", "tasks.base",
                      "gprune.errors"})


@dataclass(frozen=True)
class CodeDigest:
    """A stage's code digest and what it covers (module names, resource paths)."""

    stage: str
    digest: str
    modules: tuple[str, ...]
    files: tuple[str, ...]

    def manifest(self) -> dict:
        """What an artifact's manifest records about its code."""
        return {"code_digest": self.digest, "code_modules": list(self.modules),
                "code_files": list(self.files)}


def stage_digest(stage: str, root: Optional[str | Path] = None) -> CodeDigest:
    """The code digest of ``stage`` (a stage without declared roots covers no modules)."""
    return _stage_digest(stage, str(root) if root is not None else None)


def module_digest(module: str, root: Optional[str | Path] = None) -> str:
    """The digest of one project module and everything it imports ("" outside the project:
    a plugin's version is its package's). For code a stage reaches only at run time (a
    method or allocator found by name), so its stage's key can include it."""
    return _module_digest(module, str(root) if root is not None else None)


def clear_cache() -> None:
    """Forget every computed digest (for tests that edit sources)."""
    for cached in (_stage_digest, _module_digest, _package_dirs, _module_file, _analysis):
        cached.cache_clear()


@functools.lru_cache(maxsize=None)
def _module_digest(module: str, root: Optional[str]) -> str:
    dirs = _package_dirs(root)
    if _module_file(module, dirs) is None:
        return ""
    return _digest(f"module-root\0{module}\n", (module,), dirs)[0]


@functools.lru_cache(maxsize=None)
def _stage_digest(stage: str, root: Optional[str]) -> CodeDigest:
    digest, modules, files = _digest(f"stage\0{stage}\n", STAGE_ROOTS.get(stage, ()),
                                     _package_dirs(root))
    return CodeDigest(stage, digest, modules, files)


def _digest(header: str, roots: tuple[str, ...], dirs: tuple[tuple[str, Path], ...]
            ) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(digest, modules, resource files) of the project code reachable from ``roots``."""
    modules = closure(roots, dirs)
    files = tuple(sorted(f for m in modules for f in _resources(m, dirs)))
    h = hashlib.sha256(header.encode())
    for name in modules:
        h.update(f"module\0{name}\0{_analysis(_module_file(name, dirs), name)[1]}\n".encode())
    for rel in files:
        h.update(f"file\0{rel}\0{_file_hash(_resource_path(rel, dirs))}\n".encode())
    return h.hexdigest()[:24], modules, files


@functools.lru_cache(maxsize=None)
def _package_dirs(root: Optional[str]) -> tuple[tuple[str, Path], ...]:
    """(package, folder) of each project package: under ``root``, else where Python finds it."""
    if root is not None:
        return tuple((p, Path(root) / p) for p in PACKAGES)
    found = []
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise GpruneError(f"package {package} not found; install gprune (pip install -e .)")
        found.append((package, Path(list(spec.submodule_search_locations)[0])))
    return tuple(found)


@functools.lru_cache(maxsize=None)
def _module_file(name: str, dirs: tuple[tuple[str, Path], ...]) -> Optional[Path]:
    """The source file of a project module (``a/b.py`` or ``a/b/__init__.py``), else None."""
    top, *rest = name.split(".")
    base = dict(dirs).get(top)
    if base is None:
        return None
    folder = base.joinpath(*rest)
    for candidate in (folder / "__init__.py", folder.with_suffix(".py") if rest else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def closure(roots: tuple[str, ...], dirs: tuple[tuple[str, Path], ...]) -> tuple[str, ...]:
    """Sorted names of the project modules reachable from ``roots`` by imports."""
    seen: set[str] = set()
    todo = [m for r in roots for m in _with_parents(r)]
    while todo:
        name = todo.pop()
        if name in seen or name in PLUMBING:
            continue
        path = _module_file(name, dirs)
        if path is None:
            continue
        seen.add(name)
        for imported in _analysis(path, name)[0]:
            todo.extend(_with_parents(imported))
    return tuple(sorted(seen))


# CPython 3.11's ast.parse is not thread-safe ("AST constructor recursion depth mismatch"
# when stage tasks of the thread runner compute digests at once): one parse at a time
_PARSING = threading.Lock()


@functools.lru_cache(maxsize=None)
def _analysis(path: Path, module: str) -> tuple[tuple[str, ...], str]:
    """(modules the file imports, hash of its normalized source), parsed once."""
    source = path.read_text(encoding="utf-8")
    with _PARSING:
        imported = imports_of(source, module, is_package=path.name == "__init__.py")
        return tuple(imported), hashlib.sha256(normalized_source(source).encode()).hexdigest()


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> [a, a.b, a.b.c]: importing a module runs its packages' ``__init__``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imports_of(source: str, module: str, is_package: bool) -> list[str]:
    """Every module an import statement of ``source`` may name, at any depth; for
    ``from x import y`` both ``x`` and ``x.y`` (y may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            if base is None:
                continue
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
    return found


def _absolute(target: Optional[str], level: int, package: str) -> Optional[str]:
    if level == 0:
        return target
    parts = package.split(".") if package else []
    if level - 1 > len(parts):
        return None
    base = parts[:len(parts) - (level - 1)]
    return ".".join(base + ([target] if target else [])) or None


def normalized_source(source: str) -> str:
    """``ast.dump`` of the module without docstrings: blind to comments and layout."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:]
    return ast.dump(tree)


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _resources(module: str, dirs: tuple[tuple[str, Path], ...]) -> list[str]:
    """Resource files of a module, as '<package>/<relative path>' strings."""
    path = _module_file(module, dirs)
    if path is None or module not in RESOURCES:
        return []
    top = module.split(".")[0]
    base = dict(dirs)[top]
    return [f"{top}/{p.relative_to(base).as_posix()}"
            for pattern in RESOURCES[module] for p in sorted(path.parent.glob(pattern))
            if p.is_file()]


def _resource_path(rel: str, dirs: tuple[tuple[str, Path], ...]) -> Path:
    top, _, rest = rel.partition("/")
    return dict(dirs)[top] / rest
