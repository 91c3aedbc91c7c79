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
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt's parameter numbers (malloc.h)
ENV_OVERRIDE = "MALLOC_MMAP_THRESHOLD_"  # glibc's own variable: when the user sets it, theirs wins
CACHE_ENV_OVERRIDES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: free memory at the top of the heap is kept up to 2 GiB


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
