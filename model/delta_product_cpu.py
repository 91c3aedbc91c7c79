"""The fused CPU kernel for one block of DeltaProduct chunks (delta_product_cpu.cpp), built on first use.

delta_product_kernels.py runs a block through `block_forward` / `block_backward` when `library()` is not None and
the block qualifies (CPU, fp32, no document starts inside it); everything else takes its torch ops. The source is
compiled with the machine's g++ (-O3 -march=native -fopenmp) against torch's own MKL and OpenMP runtime into
~/.cache/seedlm/kernels (SEEDLM_KERNEL_CACHE to move it), once per source, torch version and CPU model; ranks that
build at once each write their own temporary file and rename it into place. No compiler, a failed build or
SEEDLM_FUSED_CPU_KERNEL=0: None, with one warning, and the torch ops serve.

Imports only the standard library and torch (copied next to the modeling files for remote code; without the .cpp
beside it, library() is None).
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
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("delta_product_cpu.cpp")
MAX_TOKENS_PER_CHUNK, MAX_POSITIONS_PER_CHUNK = 256, 1024  # the kernel's stack buffers of per-chunk decays
_library: ctypes.CDLL | None | bool = False  # False: not tried yet


def _cpu_model() -> str:  # benchmarks/floors.py has its twin; this file may import only stdlib and torch
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _build(cache: Path) -> Path:
    torch_lib = Path(torch.__file__).parent / "lib"
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), torch.__version__, _cpu_model(), *flags]).encode())
    target = cache / f"delta_product_cpu_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        subprocess.run([shutil.which("g++") or "g++", *flags, str(SOURCE), "-o", tmp, f"-L{torch_lib}", "-ltorch_cpu",
                        f"-Wl,-rpath,{torch_lib}"], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be had (see the module docstring)."""
    global _library
    if _library is not False:
        return _library
    _library = None
    if os.environ.get("SEEDLM_FUSED_CPU_KERNEL", "1") == "0" or not SOURCE.exists():
        return None
    cache = Path(os.environ.get("SEEDLM_KERNEL_CACHE", Path.home() / ".cache" / "seedlm" / "kernels"))
    try:
        lib = ctypes.CDLL(str(_build(cache)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        warnings.warn(f"the fused DeltaProduct CPU kernel could not be built, the torch ops serve instead "
                      f"(slower): {detail[-500:]}", stacklevel=2)
        return None
    ints, ptr = [ctypes.c_int] * 7, ctypes.c_void_p
    lib.delta_product_block_forward.argtypes = [*ints, *[ptr] * 8]
    lib.delta_product_block_backward.argtypes = [*ints, *[ptr] * 14]
    _library = lib
    return lib


def qualifies(q: torch.Tensor, k: torch.Tensor, resets: dict, captures) -> bool:
    """Whether a block (q [NC, B, H, Ct, K], k [NC, B, H, C, K]) can run fused: fp32 on CPU, no state reset inside
    it, and a captured state (a document's last) at most after its last chunk, which is the state the kernel
    returns."""
    NC, Ct, C = q.shape[0], q.shape[3], k.shape[3]
    return (q.device.type == "cpu" and q.dtype == torch.float32 and not resets and Ct <= MAX_TOKENS_PER_CHUNK
            and C <= MAX_POSITIONS_PER_CHUNK and set(captures) <= {NC - 1} and library() is not None)


def _strides(*tensors: torch.Tensor) -> torch.Tensor:
    """The kernel's stride table: per tensor, the element strides of its chunk, batch, head and row dimensions."""
    return torch.tensor([list(x.stride()[:4]) for x in tensors], dtype=torch.int64)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dimension is contiguous (the kernel reads any other strides), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def block_forward(q, k, v, beta, g, n, S0, out=None):
    """_chunk_scan's forward for a block that qualifies. q [NC, B, H, Ct, K] ... as there, any strides (chunk-major
    views of token-major tensors are read in place); g None: ungated. `out` (o's shape, any strides, e.g. a view of
    the token-major output) receives o. Returns (o [NC, B, H, Ct, V], the state after the block [B, H, K, V])."""
    NC, B, H, Ct, K = q.shape
    V = v.shape[-1]
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    g = g if g is not None else q.new_zeros(NC, B, H, Ct)  # exp(0) = 1: the ungated recurrence
    S = S0.to(torch.float32).reshape(B * H, K, V).clone()
    o = out if out is not None else q.new_empty(NC, B, H, Ct, V)
    assert o.shape == (NC, B, H, Ct, V) and o.stride(-1) == 1
    strides = _strides(q, k, v, beta, g, o)
    library().delta_product_block_forward(
        NC * B * H, B * H, H, Ct, n, K, V, q.data_ptr(), k.data_ptr(), v.data_ptr(), beta.data_ptr(), g.data_ptr(),
        S.data_ptr(), o.data_ptr(), strides.data_ptr())
    return o, S.view(B, H, K, V)


def block_backward(q, k, v, beta, g, n, S0, d_o, d_S_last, grads):
    """_chunk_scan_backward for a block that qualifies: writes the gradients of q, k, v, beta, g into `grads`
    (the inputs' shapes, any strides with the last dimension contiguous; None for g=None) and returns that of the
    entry state [B, H, K, V]."""
    NC, B, H, Ct, K = q.shape
    V = v.shape[-1]
    q, k, v, d_o = (_rows_contiguous(x) for x in (q, k, v, d_o))
    gated = g is not None
    g = g if gated else q.new_zeros(NC, B, H, Ct)
    dq, dk, dv, dbeta, dg = grads
    dg = dg if gated else torch.empty_like(g)
    assert all(x.stride(-1) == 1 for x in (dq, dk, dv))
    S0 = S0.to(torch.float32).contiguous()
    dS = d_S_last.to(torch.float32).reshape(B * H, K, V).clone()
    strides = _strides(q, k, v, beta, g, d_o, dq, dk, dv, dbeta, dg)
    library().delta_product_block_backward(
        NC * B * H, B * H, H, Ct, n, K, V, q.data_ptr(), k.data_ptr(), v.data_ptr(), beta.data_ptr(), g.data_ptr(),
        S0.data_ptr(), d_o.data_ptr(), dS.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dbeta.data_ptr(),
        dg.data_ptr(), strides.data_ptr())
    return dS.view(B, H, K, V)
