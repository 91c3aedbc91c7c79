"""The host allocator (glibc malloc): what a rank's resident memory holds beyond its tensors.

glibc serves allocations below its mmap threshold from the heap, and raises that threshold (up to 32 MiB) each
time a larger mapped block is freed. After the first training step, the blocks a step frees (a ZeRO-3 layer's
gathered weights, activations, gradient buckets) are therefore kept in the heap, resident: measured +300 MiB
per rank on a 32M-parameter model at ZeRO 3 (tests/test_plan.py), memory of the allocator, not of any tensor.

    set_mmap_threshold(1 << 20)   # blocks of 1 MiB and more are mapped on their own and returned when freed
    release_free_heap()           # hand free heap pages back now (after building the model layer by layer)

The fixed threshold costs fresh zero-filled pages at every large allocation: on a small CPU model (the gated-
attention paper preset, 60 steps) system time rose from 2 s to 13 s and wall time by 25%, so `seedlm train`
keeps glibc's default unless `train.host_mmap_threshold` asks (benchmarks/bench_host_allocator.py measures
both sides).

The other way round, glibc's default still maps every block above 32 MiB on its own and unmaps it when freed:
a 216M-parameter MoE on one CPU process faults in ~1.5 GiB of fresh pages every step, over half of its step
time in the kernel. `keep_freed_blocks` (`train.host_allocator_cache`) makes glibc a caching allocator, as
jemalloc or the CUDA caching allocator are: no block is mapped on its own and freed memory stays in the heap
for the next step. Peak resident memory grows by what the heap keeps (bench_host_allocator.py).
Other allocators (musl, jemalloc preloaded) are left alone.

`copy_bytes` copies large host tensors with glibc's memmove on several threads (the background checkpoint's host
copy). Above glibc's non-temporal threshold memmove streams its stores past the caches, which torch's copy_
never does: 20-22 GB/s on 2 threads here against 13 GB/s (2 threads, 64 MiB pieces). glibc sets the threshold at
3/4 of a thread's share of the L3; these VMs report a 480 MiB L3, which puts it near 180 MiB, so only
`GLIBC_TUNABLES=glibc.cpu.x86_non_temporal_threshold=4194304` (read at process start) lets pieces of a few MiB
stream here; on a host reporting a usual L3 the threshold is a few MiB already.
"""

from __future__ import annotations

import ctypes
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt's parameter numbers (malloc.h)
ENV_OVERRIDE = "MALLOC_MMAP_THRESHOLD_"  # glibc's own variable: when the user sets it, theirs wins
CACHE_ENV_OVERRIDES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: free memory at the top of the heap is kept up to 2 GiB
THREADED_COPY_MIN_BYTES = 4 << 20  # below this one thread: handing a copy to threads costs more than it saves


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def set_mmap_threshold(num_bytes: int | None) -> str:
    """Fix glibc's mmap threshold at num_bytes (None: leave glibc's self-raising default). Returns a log line."""
    if num_bytes is None:
        return "host allocator: glibc's default (self-raising mmap threshold)"
    if ENV_OVERRIDE in os.environ:
        return f"host allocator: {ENV_OVERRIDE}={os.environ[ENV_OVERRIDE]} from the environment"
    libc = _glibc()
    if libc is None or libc.mallopt(M_MMAP_THRESHOLD, int(num_bytes)) != 1:
        return "host allocator: not glibc, left as it is"
    return f"host allocator: glibc mmap threshold fixed at {num_bytes / 2**20:g} MiB (train.host_mmap_threshold)"


def keep_freed_blocks() -> str:
    """Make glibc keep freed memory for reuse: no block mapped on its own (M_MMAP_MAX 0), the top of the heap
    not trimmed. release_free_heap still hands free pages back when called. Returns a log line."""
    set_by_user = [name for name in CACHE_ENV_OVERRIDES if name in os.environ]
    if set_by_user:
        return "host allocator: " + ", ".join(f"{n}={os.environ[n]}" for n in set_by_user) + " from the environment"
    libc = _glibc()
    if libc is None or libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) != 1:
        return "host allocator: not glibc, left as it is"
    return "host allocator: glibc keeps freed blocks for reuse (train.host_allocator_cache)"


def release_free_heap() -> None:
    """Hand the freed whole-layer buffers back to the OS. Partitions allocated in between keep freed heap pages
    from being trimmed at the top: without this a rank's resident memory grows by every layer it ever held
    whole (measured: more than the whole model on 2 ranks, tests/test_materialize.py). malloc_trim also
    releases free pages inside the heap."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


NON_TEMPORAL_TUNABLE = "glibc.cpu.x86_non_temporal_threshold"


def host_copy_line() -> str:
    """A log line for CPU training with background saves: whether their host copies can stream (see the module
    docstring). glibc's threshold itself cannot be read, only whether the environment sets it."""
    if NON_TEMPORAL_TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return "background saves: host copies stream past the caches above the non-temporal threshold in GLIBC_TUNABLES"
    return (f"background saves: host copies stream past the caches only above glibc's non-temporal threshold (3/4 "
            f"of a thread's share of the L3); where the L3 is large, GLIBC_TUNABLES={NON_TEMPORAL_TUNABLE}=4194304 "
            f"at launch makes them ~1.4x faster (README, checkpoints)")


_memmove = None
_copy_threads: dict[int, ThreadPoolExecutor] = {}  # by thread count: torch.set_num_threads may change it


def _libc_memmove():
    global _memmove
    if _memmove is None:
        libc = _glibc()
        if libc is None:
            _memmove = False
        else:
            _memmove = libc.memmove
            _memmove.restype = ctypes.c_void_p
            _memmove.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return _memmove


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src). Contiguous CPU tensors of the same dtype and shape are copied by glibc's memmove, so that a
    large copy can stream past the caches (see the module docstring): from THREADED_COPY_MIN_BYTES on in
    torch.get_num_threads() pieces at once (ctypes releases the GIL), below it in the calling thread. The small
    ones stay out of torch too: after each of its parallel regions torch's OpenMP threads spin for a while, and
    interleaved with the threaded copies they took half the cores (host copy of a 2.4 GiB state, 1 MiB tensors
    between 32-64 MiB ones: 0.24 s against 0.14 s). Anything else goes through copy_."""
    nbytes = src.numel() * src.element_size()
    memmove = _libc_memmove()
    if (not memmove or src.device.type != "cpu" or dst.device.type != "cpu" or src.dtype != dst.dtype
            or dst.shape != src.shape or not (src.is_contiguous() and dst.is_contiguous())):
        return dst.copy_(src)
    threads = max(1, torch.get_num_threads()) if nbytes >= THREADED_COPY_MIN_BYTES else 1
    d, s = dst.data_ptr(), src.data_ptr()
    if threads == 1:
        if nbytes:
            memmove(d, s, nbytes)
        return dst
    if threads not in _copy_threads:
        _copy_threads[threads] = ThreadPoolExecutor(threads, thread_name_prefix="seedlm-copy")
    pool = _copy_threads[threads]
    piece = -(-nbytes // threads // 4096) * 4096  # page multiples: no two threads store into one cache line
    pieces = [(d + o, s + o, min(piece, nbytes - o)) for o in range(0, nbytes, piece)]
    list(pool.map(lambda p: memmove(*p), pieces))
    return dst
