"""The C kernels of kernels/ (decode.c and the row products of rowdot.h), compiled once per machine with its own C
compiler and loaded with ctypes.

Compiled with -O3 -march=native, so the code is tuned to the CPU it runs on, and with OpenMP, whose runtime is the one
torch has already loaded (libgomp): the kernels share torch's threads instead of fighting them. The library is kept
in the cache directory under a key of the sources, the compiler and the CPU, so a second process loads it at once.
No compiler (or a failed build) is not an error: `library()` returns None, `why_unavailable()` says why in one
line, and the model keeps the PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .assets import cache_dir

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SOURCES = ("decode.c",)            # it includes rowdot.h and quants.h
DISABLE_ENV = "MISTRAL_TUTORIAL_NO_NATIVE"            # set to 1: never build or load the C kernels
# -march=native (gcc, clang on x86), -mcpu=native (clang on Arm), then nothing; OpenMP if the compiler has it
_ARCH_FLAGS = (["-march=native"], ["-mcpu=native"], [])
_OPENMP_FLAGS = (["-fopenmp"], [])
_state: dict[str, object] = {}
FORMATS = {torch.float32: 0, torch.bfloat16: 1}           # enum mt_format in kernels/rowdot.h


class Matrix(ctypes.Structure):
    """mt_matrix (kernels/rowdot.h): one weight matrix (rows, cols) as it lies in memory."""

    _fields_ = [("data", ctypes.c_void_p), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("row_bytes", ctypes.c_int64), ("format", ctypes.c_int32), ("unused", ctypes.c_int32)]

    @classmethod
    def of(cls, weight: torch.Tensor) -> Matrix:
        """The mt_matrix of a contiguous (out, in) fp32 or bf16 tensor (its memory, not a copy)."""
        rows, cols = weight.shape
        return cls(weight.data_ptr(), rows, cols, cols * weight.element_size(), FORMATS[weight.dtype], 0)


def compiler() -> str | None:
    """$CC, else cc, gcc or clang on the PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


@functools.lru_cache(maxsize=1)
def cpu_signature() -> str:
    """The CPU's model name and flags (Linux /proc/cpuinfo), else what platform says: part of every cache key."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        return f"{fields.get('model name', platform.processor())} | {fields.get('flags', fields.get('Features', ''))}"
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cpu_name() -> str:
    """The CPU's model name, as `lscpu` gives it."""
    return cpu_signature().split(" | ")[0] or platform.machine()


def _build(cc: str, out: Path) -> str | None:
    """Compile the sources into `out`; None on success, else the compiler's last line."""
    sources = [str(KERNEL_DIR / s) for s in SOURCES]
    error = "no flags tried"
    for arch in _ARCH_FLAGS:
        for openmp in _OPENMP_FLAGS:
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                target = Path(tmp) / out.name
                command = [cc, "-O3", "-fPIC", "-shared", *arch, *openmp, "-o", str(target), *sources, "-lm"]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode == 0:
                    os.replace(target, out)                   # atomic: another process never sees half a file
                    return None
                error = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
    return error


def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None where they cannot be had (see `why_unavailable`)."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    _state["lib"], _state["why"] = None, None
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        _state["why"] = f"${DISABLE_ENV} is set"
        return None
    cc = compiler()
    if cc is None:
        _state["why"] = "no C compiler on the PATH (install gcc or clang, or set $CC)"
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    digest = hashlib.sha256()
    for name in sorted(os.listdir(KERNEL_DIR)):
        if name.endswith((".c", ".h")):
            digest.update(name.encode() + (KERNEL_DIR / name).read_bytes())
    digest.update(repr((version, cpu_signature(), platform.machine())).encode())
    out = cache_dir() / "kernels" / digest.hexdigest()[:16] / "libmistral_tutorial.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        error = _build(cc, out)
        if error is not None:
            _state["why"] = f"the C kernels did not compile with {cc}: {error}"
            return None
    try:
        lib = ctypes.CDLL(str(out))
    except OSError as err:
        _state["why"] = f"the compiled kernels {out} did not load: {err}"
        return None
    for name in ("mt_decode_step", "mt_matvec", "mt_unpack_rows"):
        getattr(lib, name).restype = None
    _state["lib"] = lib
    return lib


def matvec(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x (..., in) fp32 -> x W^T (..., out) fp32 with the C row products: W read once, in its own format (fp32 or
    bf16, widened in registers), the sums in fp32. For a few rows at a time: each row of W is re-read from the cache
    for every row of x."""
    return matvec_of(Matrix.of(weight), x).reshape(*x.shape[:-1], weight.shape[0])


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the C kernels are not available: {why_unavailable()}")
    return lib


def matvec_of(w: Matrix, x: torch.Tensor) -> torch.Tensor:
    """x (N, cols) fp32 -> (N, rows) fp32 = x W^T, for the mt_matrix `w` (any format of kernels/rowdot.h)."""
    flat = x.reshape(-1, w.cols).contiguous()                                          # (N, in)
    out = torch.empty(flat.shape[0], w.rows)                                           # (N, out)
    _lib().mt_matvec(ctypes.byref(w), ctypes.c_void_p(flat.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                     ctypes.c_int64(flat.shape[0]), ctypes.c_int(torch.get_num_threads()))
    return out


def unpack_rows(w: Matrix, which: torch.Tensor | None, out: torch.Tensor) -> None:
    """out (n, cols) fp32 = the rows `which` (n,) int64 of `w` unpacked to fp32 (every row if None)."""
    n = w.rows if which is None else which.numel()
    _lib().mt_unpack_rows(ctypes.byref(w), None if which is None else ctypes.c_void_p(which.data_ptr()),
                          ctypes.c_int64(n), ctypes.c_void_p(out.data_ptr()), ctypes.c_int(torch.get_num_threads()))


def why_unavailable() -> str | None:
    """None when the kernels load, else why not (one line)."""
    library()
    return _state["why"]  # type: ignore[return-value]
