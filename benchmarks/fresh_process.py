"""Child processes for measurements that need a fresh heap, without paying the imports each time.

A benchmark's peak memory must not include what an earlier measurement left in the allocator, so such
measurements run in a new process. Spawned, each one imported torch and transformers again: 8-12 s of CPU on the
2-core AMD EPYC VM, several times per benchmark. Forked from a fork server instead, a child starts with those
modules already imported and nothing else: the server imports them once and runs nothing, so no heap, allocator
cache or OpenMP thread pool is carried into the children.
"""

from __future__ import annotations

import multiprocessing


def fresh_process_context(*preload: str):
    """A multiprocessing context whose processes fork from a server that imported the main script, torch and
    `preload` once. One server per process that asks first: its preload list is fixed when it starts."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "torch", *preload])
    return context
