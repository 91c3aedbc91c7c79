"""torch.save files written with O_DIRECT: the bytes go from host memory to the disk without the page cache.

A buffered write of a checkpoint costs the CPU a copy of every byte into the page cache and then the kernel's
writeback, on the cores training uses: about 2.5 s of CPU per GiB on this project's 2-core machines, against
0.01 s with O_DIRECT (the same 1 GiB, fsynced, `benchmarks/bench_checkpoint_save.py` measures what it means for
training). torch's zip writer hands each tensor's storage to `write()` in one call, at a file offset aligned to
`torch.utils.serialization.config.save.storage_alignment`; with that set to the block size and the storage itself
page-aligned (`aligned_storage`, which the background save's host copies use), the storage goes to the disk
as it is. Everything else (zip headers, the pickle, unaligned storages) is gathered in an aligned bounce buffer.
The zip CRC is not computed: miniz's CRC costs about 3 s of CPU per GiB here, torch.load does not need it, and
the checkpoint manifest (launch/checkpoint.py) checks each file's size. A filesystem without O_DIRECT (EINVAL)
gets the same bytes through a plain buffered write.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import torch
from torch.utils.serialization import config as serialization_config

BLOCK = 4096  # O_DIRECT needs buffer addresses, sizes and file offsets aligned to the logical block size
BOUNCE_BYTES = 8 << 20


def aligned_storage(nbytes: int) -> torch.UntypedStorage:
    """A CPU storage of `nbytes` whose data starts on a page boundary (anonymous mmap), for O_DIRECT writes."""
    if nbytes == 0:
        return torch.UntypedStorage(0)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).untyped_storage()  # keeps the mmap alive


def address(data: memoryview) -> int:
    return np.frombuffer(data, dtype=np.uint8).ctypes.data if len(data) else 0


class DirectFile:
    """A write-only file object for torch.save: aligned runs go straight to the disk, the rest through the
    bounce buffer. close() pads the last block, truncates the file to its real size and fsyncs it."""

    def __init__(self, path: os.PathLike):
        self.size = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self.fd, self.direct = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o644), hasattr(os, "O_DIRECT")
        except OSError:  # EINVAL: the filesystem has no O_DIRECT
            self.fd, self.direct = os.open(path, flags, 0o644), False
        self.bounce = memoryview(mmap.mmap(-1, BOUNCE_BYTES))
        self.filled = 0  # bytes waiting in the bounce buffer; the file holds self.size - self.filled so far

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        n = len(data)
        self.size += n
        if self.direct and self.filled % BLOCK == 0 and n >= BLOCK and address(data) % BLOCK == 0:
            self.flush_whole_blocks()  # empties it: it ends on a block boundary
            head = n - n % BLOCK
            self.write_all(data[:head])
            data = data[head:]
        while len(data):
            take = min(len(data), BOUNCE_BYTES - self.filled)
            self.bounce[self.filled:self.filled + take] = data[:take]
            self.filled += take
            data = data[take:]
            if self.filled == BOUNCE_BYTES:
                self.flush_whole_blocks()
        return n

    def flush_whole_blocks(self) -> None:
        """Write the bounce buffer's whole blocks and keep the rest (less than a block) at its start."""
        whole = self.filled - self.filled % BLOCK
        self.write_all(self.bounce[:whole])
        self.bounce[:self.filled - whole] = self.bounce[whole:self.filled]
        self.filled -= whole

    def write_all(self, data: memoryview) -> None:
        while len(data):
            data = data[os.write(self.fd, data):]

    def flush(self) -> None:
        pass  # torch.save calls it; the bytes reach the file in close()

    def close(self) -> None:
        try:
            tail = self.filled
            if tail:
                padded = -(-tail // BLOCK) * BLOCK if self.direct else tail
                self.bounce[tail:padded] = bytes(padded - tail)
                self.write_all(self.bounce[:padded])
                self.filled = 0
            os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without finishing the file (torch.save failed): the caller discards it."""
        os.close(self.fd)
        self.bounce.release()


def save_direct(obj, path: os.PathLike) -> None:
    """torch.save(obj, path) through a DirectFile, fsynced: storages aligned in the file, no CRC."""
    file = DirectFile(path)
    try:
        with serialization_config.patch({"save.compute_crc32": False, "save.storage_alignment": BLOCK}):
            torch.save(obj, file)
    except BaseException:
        file.abort()
        raise
    file.close()
