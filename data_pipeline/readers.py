"""Readers: which records of each source a reader reads, in which order, and where it stands.

Readers. Every (data-parallel rank, DataLoader worker) pair is one reader, `reader = rank *
num_workers + worker_id` of `R = world_size * num_workers`. For each source a reader takes the shards
`s % R == reader` when the source has at least R shards (as `datasets.distributed.split_dataset_by_node`
does over shards); with fewer, every shard is cut into pieces (Parquet row groups, byte ranges of jsonl
and text: `reader_pieces`) dealt round-robin. Either way no record is read by two readers, and the
readers together cover the source once per epoch.

Order. Per reader and source, each epoch visits the reader's shards in a seeded order; documents are
taken in blocks of `shuffle_buffer` documents, each block tokenised in one batched call and shuffled
with a seed of (seed, source, reader, epoch, block). Several sources are mixed per document by a
seeded sampler with the normalised weights; each source repeats its own epochs (training), or stops
after `num_epochs` passes, when the mixture goes on with the sources that are left.

A reader's position (SourceReader.state) is a few integers per source: epoch, piece, the record key at the
block's start, block number, index in the block; DocumentStream adds the mixture sampler's draw count.
Restoring seeks to the block's start (a row group, a byte offset) and re-reads and re-tokenises that block.
Packing the documents into rows, and the loader's state around them, are in loader.py.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .config import DataConfig, DataError
from .sources import Source

logger = logging.getLogger(__name__)

_DRAWS_PER_CHUNK = 1024  # mixture draws come from a counter-based RNG in chunks of this size
_END = 2**62  # the key past a shard's last record, in intervals of consumed records


def reader_pieces(source: Source, reader: int, num_readers: int) -> list[tuple[int, int, int | None]]:
    """(shard, start key, stop key or None) of the pieces one reader owns. With at least as many shards as readers
    a piece is a whole shard, dealt `shard % R == reader`; with fewer, each shard is cut (`Source.split_points`)
    into R / gcd(shards, R) pieces, dealt round-robin, so that every byte is read by one reader."""
    n = source.num_shards
    if n >= num_readers:
        return [(s, 0, None) for s in range(n) if s % num_readers == reader]
    parts = num_readers // math.gcd(n, num_readers)
    pieces = []
    for shard in range(n):
        points = source.split_points(shard, parts)
        pieces += [(shard, a, b) for a, b in zip(points, points[1:] + [None])]
    return pieces[reader::num_readers]


class SourceReader:
    """One reader's document stream from one source (see the module docstring)."""

    def __init__(
        self,
        source: Source,
        src_idx: int,
        reader: int,
        num_readers: int,
        config: DataConfig,
        num_epochs: int | None,
        shuffle: bool,
        tokenize: Callable[[list[str]], list[np.ndarray]] | None,
        bad_counts: dict[str, int],
    ):
        self.source, self.src_idx, self.reader, self.num_readers = source, src_idx, reader, num_readers
        self.seed, self.block_size, self.strict = config.seed, config.shuffle_buffer, config.strict
        self.num_epochs, self.shuffle, self.tokenize, self.bad_counts = num_epochs, shuffle, tokenize, bad_counts
        self.pieces = reader_pieces(source, reader, num_readers)
        self._order_cache: tuple[int, list[tuple[int, int, int | None]]] | None = None
        # Position of the current block's start (piece in the epoch's order, first key to read in it; 0 = the
        # piece's start), and the index of the next document in the block.
        self.epoch = self.piece_pos = self.key = self.block_no = self.idx = 0
        self.exhausted = False
        self.block: list[np.ndarray] | None = None  # tokenised documents of the current block
        self.order: np.ndarray | None = None  # [len(block)] shuffled order of the block
        self.next_cursor: tuple[int, int] = (0, 0)  # (piece_pos, key) after the block
        self._count = True  # False while re-reading a block whose bad records were already counted
        # Records other readers consumed before the run moved to this topology: [epoch, shard, start, stop]
        # intervals of keys, skipped in those epochs (`portable_position`).
        self.skip: list[list[int]] = []
        self._skip_index: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    # -- state
    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "piece_pos": self.piece_pos, "key": self.key, "block_no": self.block_no,
            "idx": self.idx, "exhausted": self.exhausted,
            # whether the current block's bad records were already counted (it was read, or is about to be re-read)
            "counted": self.block is not None or not self._count,
            "skip": self.skip,
        }  # fmt: skip

    def load_state(self, st: dict[str, Any]) -> None:
        position = (st["epoch"], st["piece_pos"], st["key"], st["block_no"])
        if self.block is not None and position == (self.epoch, self.piece_pos, self.key, self.block_no) \
                and self.skip == [s for s in st["skip"] if s[0] >= st["epoch"]]:
            # the block already read for an earlier state of this resume (another lane's pending document): the
            # same documents in the same order, not read, tokenised or counted again
            self.idx, self.exhausted = st["idx"], st["exhausted"]
            return
        self.epoch, self.piece_pos, self.key = st["epoch"], st["piece_pos"], st["key"]
        self.block_no, self.idx, self.exhausted = st["block_no"], st["idx"], st["exhausted"]
        self.block = self.order = None
        self._count = not st["counted"]  # re-reading a block must not count its bad records twice
        self._set_skip(st["skip"])

    def _set_skip(self, skip: list[list[int]]) -> None:
        self.skip = [s for s in skip if s[0] >= self.epoch]
        self._skip_index = {}
        for epoch, shard, a, b in sorted(self.skip):
            starts, ends = self._skip_index.setdefault((epoch, shard), ([], []))
            starts.append(a)
            ends.append(b)

    def _skipped_until(self, shard: int, key: int) -> int | None:
        """The end of the consumed interval holding `key` in this epoch, or None when `key` was not consumed."""
        index = self._skip_index.get((self.epoch, shard))
        if index is None:
            return None
        i = bisect.bisect_right(index[0], key) - 1
        return index[1][i] if i >= 0 and key < index[1][i] else None

    # -- reading
    def _epoch_pieces(self, epoch: int) -> list[tuple[int, int, int | None]]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = list(self.pieces)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, self.src_idx, epoch, self.reader]).permutation(len(order))
                order = [self.pieces[i] for i in perm]
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _read_block(self) -> tuple[list[str], list[tuple[int, int]]]:
        """Texts and (shard, key) of the block starting at the current position: up to shuffle_buffer good
        records; sets `next_cursor` to the position after it."""
        pieces = self._epoch_pieces(self.epoch)
        texts: list[str] = []
        keys: list[tuple[int, int]] = []
        piece_pos, key = self.piece_pos, self.key
        while piece_pos < len(pieces) and len(texts) < self.block_size:
            shard, start, stop = pieces[piece_pos]
            key = max(key, start)
            key = self._skipped_until(shard, key) or key  # a consumed head is not read at all
            full = False
            records = self.source.iter_records(shard, key, stop) if key < (stop or _END) else iter(())
            try:
                for rec in records:
                    if self._skipped_until(shard, rec.raw_idx) is not None:
                        continue
                    if rec.problem is not None:
                        self._bad(rec.problem, rec.where)
                        continue
                    texts.append(rec.text)
                    keys.append((shard, rec.raw_idx))
                    if len(texts) == self.block_size:
                        full, key = True, rec.raw_idx + 1
                        break
            finally:
                if hasattr(records, "close"):
                    records.close()  # release the file of a piece left mid-way
            if not full:
                piece_pos, key = piece_pos + 1, 0
        self.next_cursor = (piece_pos, key)
        return texts, keys

    def _block_order(self, n: int) -> np.ndarray:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.src_idx, self.reader, self.epoch, self.block_no])
            return rng.permutation(n)
        return np.arange(n)

    def _load_block(self) -> None:
        texts, _ = self._read_block()
        self._count = True
        self.block = self.tokenize(texts) if texts else []
        self.order = self._block_order(len(self.block))

    def consumed(self, floor: int) -> list[list[int]]:
        """[epoch, shard, start, stop] intervals of the keys this reader has consumed in epochs >= floor, its
        current block's drawn documents included (re-read, not tokenised): what another topology must skip."""
        out = [s for s in self.skip if s[0] >= floor]
        for epoch in range(floor, self.epoch):
            out += [[epoch, shard, a, b if b is not None else _END] for shard, a, b in self.pieces]
        if self.exhausted:
            return out
        pieces = self._epoch_pieces(self.epoch)
        out += [[self.epoch, shard, a, b if b is not None else _END] for shard, a, b in pieces[: self.piece_pos]]
        if self.piece_pos < len(pieces):
            shard, a, _ = pieces[self.piece_pos]
            if self.key > a:
                out.append([self.epoch, shard, a, self.key])
        if self.idx:
            self._count = False  # these bad records were counted by the reader that saved the state
            _, keys = self._read_block()
            order = self._block_order(len(keys))
            out += [[self.epoch, shard, k, k + 1] for shard, k in (keys[i] for i in order[: self.idx])]
        return out

    def _bad(self, problem: str, where: str) -> None:
        if self.strict:
            raise DataError(f"bad record ({problem}) at {where}; strict mode is on: fix the data or set strict: false")
        if self._count:
            n = self.bad_counts[problem] = self.bad_counts[problem] + 1
            if n & (n - 1) == 0:  # the first as a warning, then at powers of two (a corpus may have many)
                logger.log(
                    logging.WARNING if n == 1 else logging.INFO,
                    "skipped bad record (%s) at %s (%d %s so far in this reader)",
                    problem,
                    where,
                    n,
                    problem,
                )

    def next_doc(self) -> np.ndarray | None:
        """Tokens of the next document, or None once `num_epochs` passes are done."""
        while not self.exhausted:
            if self.block is None:
                self._load_block()
            if self.idx < len(self.block):
                doc = self.block[self.order[self.idx]]
                self.idx += 1
                return doc
            first_block = self.piece_pos == 0 and self.key == 0 and self.block_no == 0
            if not self.block and first_block and self.num_epochs is None and not self.skip:
                # A whole epoch without a document: repeating it would loop forever. (A finite pass just ends:
                # a small held-out split may leave some readers empty.)
                raise DataError(
                    f"reader {self.reader} of {self.num_readers} got no documents from source "
                    f"{self.source.config.describe()} ({self.source.split} split, {self.source.num_shards} shards): "
                    "use fewer ranks/workers or more data"
                )
            piece_pos, key = self.next_cursor
            if piece_pos >= len(self._epoch_pieces(self.epoch)):  # epoch done
                self.epoch += 1
                piece_pos, key, self.block_no = 0, 0, 0
                self.exhausted = self.num_epochs is not None and self.epoch >= self.num_epochs
                self._set_skip(self.skip)  # the consumed records of past epochs no longer matter
            else:
                self.block_no += 1
            self.piece_pos, self.key, self.idx = piece_pos, key, 0
            self.block = self.order = None
        return None


class DocumentStream:
    """A reader's documents from all sources, mixed per document by a seeded, counter-based sampler."""

    def __init__(self, readers: list[SourceReader], weights: list[float], seed: int, reader: int):
        self.readers, self.seed, self.reader = readers, seed, reader
        w = np.asarray(weights, np.float64)
        self.probs = w / w.sum()
        self.draw = 0
        self._chunk: tuple[int, np.ndarray] | None = None

    def _choice(self, draw: int) -> int:
        chunk = draw // _DRAWS_PER_CHUNK
        if self._chunk is None or self._chunk[0] != chunk:
            rng = np.random.default_rng([self.seed, self.reader, 0x5EED, chunk])
            self._chunk = (chunk, rng.choice(len(self.probs), size=_DRAWS_PER_CHUNK, p=self.probs))
        return int(self._chunk[1][draw % _DRAWS_PER_CHUNK])

    def next(self) -> tuple[np.ndarray, int] | None:
        """(tokens, source index) of the next document, or None when every source is exhausted."""
        while not all(r.exhausted for r in self.readers):
            s = 0 if len(self.readers) == 1 else self._choice(self.draw)
            self.draw += 1
            doc = self.readers[s].next_doc()
            if doc is not None:
                return doc, s
        return None

    def state(self) -> dict[str, Any]:
        return {
            "draw": self.draw,
            "sources": [r.state() for r in self.readers],
            "bad_records": [dict(r.bad_counts) for r in self.readers],
        }

    def load_state(self, st: dict[str, Any]) -> None:
        self.draw = st["draw"]
        for r, rs, bad in zip(self.readers, st["sources"], st["bad_records"]):
            r.load_state(rs)
            r.bad_counts.clear()
            r.bad_counts.update(bad)


def make_tokenize(tokenizer: Any) -> Callable[[list[str]], list[np.ndarray]]:
    """Batched tokenisation without special tokens; a literal "</s>" in a document stays text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(backend.to_str())  # a private copy: the flag below must not leak to the caller
        tok.encode_special_tokens = True
        tok.no_truncation()
        tok.no_padding()
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets
        return lambda texts: [np.asarray(e.ids, np.int32) for e in encode(texts, add_special_tokens=False)]
    return lambda texts: [np.asarray(ids, np.int32) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
