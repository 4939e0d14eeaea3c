"""Compiled CPU kernels for the capture stage, built on first use with the system C compiler.

On a CPU the capture hooks are bound by memory passes: the pure-torch statistics
(``gprune.maths.moments``, the reference) take about nine ATen passes per activation, the C
kernels in ``capture_kernels.c`` one. They are compiled once per machine with ``$CC`` (or
``cc``) into ``$GPRUNE_CACHE/native/`` (default ``~/.cache/gprune/native/``), named by a hash
of the source, the flags and the CPU, written atomically, and loaded with ctypes (which
releases the GIL during each call).

Without a working compiler ``capture_kernels()`` warns once and returns None; capture then
uses the torch path. ``GPRUNE_NATIVE=0`` disables the kernels.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

NATIVE_ENV = "GPRUNE_NATIVE"
SOURCE = Path(__file__).with_name("capture_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fPIC", "-shared")
COMPILE_TIMEOUT_S = 120

log = logging.getLogger("gprune")
_LOCK = threading.Lock()
_LOADED: dict[str, "CaptureKernels | None"] = {}

_i64, _f64, _ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class CaptureKernels:
    """Typed entry points of the loaded library; callers check ``accepts`` first."""

    def __init__(self, library: ctypes.CDLL):
        self._moments = library.gprune_channel_moments
        self._moments.argtypes = [_ptr, _i64, _ptr, _i64, _i64, _f64, _ptr]
        self._moments.restype = None
        self._cosine = library.gprune_cosine_sum
        self._cosine.argtypes = [_ptr, _i64, _ptr, _i64, _ptr, _i64, _i64]
        self._cosine.restype = _f64

    @staticmethod
    def accepts(*matrices: torch.Tensor) -> bool:
        """True for (n, C) float32 CPU matrices with contiguous channels."""
        return all(m.device.type == "cpu" and m.dtype == torch.float32 and m.dim() == 2
                   and (m.stride(1) == 1 or m.shape[1] == 1) for m in matrices)

    def channel_moments(self, x: torch.Tensor, rows: torch.Tensor | None, tau: float,
                        totals: torch.Tensor) -> int:
        """Add the selected rows of x (N, C) to ``totals`` (4, C) float64; return their count."""
        _check_totals(totals, x.shape[1])
        index, n = _index(rows, x.shape[0])
        self._moments(x.data_ptr(), x.stride(0), index, n, x.shape[1], float(tau) ** 2,
                      totals.data_ptr())
        return n

    def cosine_sum(self, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor | None) -> float:
        """Sum over the selected rows of cos(a_r, b_r); a, b (N, H)."""
        if a.shape != b.shape:
            raise ValueError(f"cosine_sum needs equal shapes, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        index, n = _index(rows, a.shape[0])
        return self._cosine(a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), index, n,
                            a.shape[1])


def _check_totals(totals: torch.Tensor, channels: int) -> None:
    if (totals.shape != (4, channels) or totals.dtype != torch.float64
            or not totals.is_contiguous() or totals.device.type != "cpu"):
        raise ValueError(f"totals must be a contiguous (4, {channels}) float64 CPU tensor")


def _index(rows: torch.Tensor | None, n_all: int) -> tuple[int | None, int]:
    """(pointer or None, number of rows) of a row selection (None: all rows)."""
    if rows is None:
        return None, n_all
    if rows.dtype != torch.int64 or rows.dim() != 1 or not rows.is_contiguous():
        raise ValueError("the row index must be a contiguous 1-D int64 tensor")
    if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < n_all):
        raise ValueError(f"row index out of range for {n_all} rows")   # the C code trusts it
    return rows.data_ptr(), rows.numel()


def capture_kernels() -> CaptureKernels | None:
    """The compiled kernels, or None (disabled, or no compiler: warned once)."""
    if os.environ.get(NATIVE_ENV, "1").strip() == "0":
        return None
    compiler = compiler_command()
    with _LOCK:
        if compiler not in _LOADED:
            _LOADED[compiler] = _build_and_load(compiler)
        return _LOADED[compiler]


def compiler_command() -> str:
    """The C compiler the kernels are built with: $CC, else ``cc``."""
    return os.environ.get("CC") or "cc"


def _build_and_load(compiler: str) -> CaptureKernels | None:
    try:
        return CaptureKernels(ctypes.CDLL(str(_compiled(compiler))))
    except (OSError, subprocess.SubprocessError, AttributeError) as error:
        log.warning("capture: compiled kernels unavailable (%s); using the slower torch "
                    "path. Install a C compiler (or set CC) to speed up CPU capture.",
                    str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None


def _compiled(compiler: str) -> Path:
    """Path of the shared library for this source, flags and CPU; compiled if missing."""
    from gprune.models.loader import cache_dir

    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    target = cache_dir() / "native" / f"capture_kernels-{key}.so"
    if target.exists():
        return target
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler {compiler!r} on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"],
                                capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip() or result.returncode}")
        os.replace(built, target)   # atomic: concurrent builders leave one complete file
    return target


def _cpu_signature() -> str:
    """The instruction sets -march=native may use: a cache shared by machines keeps one each."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.system()}-{platform.machine()}-{platform.processor()}-{flags}"
