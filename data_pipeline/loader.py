"""Sharding, mixing, shuffling and resumable state: sources -> per-reader document streams -> packed batches.

Readers. Every (data-parallel rank, DataLoader worker) pair is one reader, `reader = rank *
num_workers + worker_id` of `R = world_size * num_workers`. For each source a reader takes the shards
`s % R == reader` when the source has at least R shards (as `datasets.distributed.split_dataset_by_node`
does over shards); with fewer shards every reader reads all of them and keeps the documents whose
global index `i % R == reader` (round-robin). Either way the readers' documents are disjoint and
together cover the source once per epoch.

Order. Per reader and source, each epoch visits the reader's shards in a seeded order; documents are
taken in blocks of `shuffle_buffer` documents, each block tokenised in one batched call and shuffled
with a seed of (seed, source, reader, epoch, block). Several sources are mixed per document by a
seeded sampler with the normalised weights; each source repeats its own epochs (training), or stops
after `num_epochs` passes, when the mixture goes on with the sources that are left.

State. A reader's position is a few integers per source (epoch, shard, record index at the block's
start, block number, index in the block), the sampler's draw count, and the packer's pending
document (the stream position before it was drawn, plus how many of its tokens are already packed).
Restoring re-reads and re-tokenises the current block of each source, then continues exactly: a
resumed run yields the same batches, token for token, as the uninterrupted one. torchdata's
`StatefulDataLoader` carries each worker's state with every batch and knows which worker is next.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .config import DataConfig, DataError
from .packing import Packer, make_batch
from .sources import PROBLEMS, Source, open_source

logger = logging.getLogger(__name__)

STATE_FORMAT = "seedlm.data_pipeline.v1"
_DRAWS_PER_CHUNK = 1024  # mixture draws come from a counter-based RNG in chunks of this size


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
        tokenize: Callable[[list[str]], list[np.ndarray]],
        bad_counts: dict[str, int],
    ):
        self.source, self.src_idx, self.reader, self.num_readers = source, src_idx, reader, num_readers
        self.seed, self.block_size, self.strict = config.seed, config.shuffle_buffer, config.strict
        self.num_epochs, self.shuffle, self.tokenize, self.bad_counts = num_epochs, shuffle, tokenize, bad_counts
        n = source.num_shards
        self.shard_mode = n >= num_readers
        self.my_shards = [s for s in range(n) if s % num_readers == reader] if self.shard_mode else list(range(n))
        self._order_cache: tuple[int, list[int]] | None = None
        # Position of the current block's start, and the index of the next document in the block.
        self.epoch = self.shard_pos = self.raw_idx = self.global_base = self.block_no = self.idx = 0
        self.exhausted = False
        self.block: list[np.ndarray] | None = None  # tokenised documents of the current block
        self.order: np.ndarray | None = None  # [len(block)] shuffled order of the block
        self.next_cursor: tuple[int, int, int] = (0, 0, 0)  # (shard_pos, raw_idx, global_base) after the block
        self._count = True  # False while re-reading a block whose bad records were already counted

    # -- state
    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "shard_pos": self.shard_pos, "raw_idx": self.raw_idx, "global_base": self.global_base,
            "block_no": self.block_no, "idx": self.idx, "exhausted": self.exhausted,
            # whether the current block's bad records were already counted (it was read, or is about to be re-read)
            "counted": self.block is not None or not self._count,
        }  # fmt: skip

    def load_state(self, st: dict[str, Any]) -> None:
        self.epoch, self.shard_pos, self.raw_idx = st["epoch"], st["shard_pos"], st["raw_idx"]
        self.global_base, self.block_no, self.idx, self.exhausted = (
            st["global_base"],
            st["block_no"],
            st["idx"],
            st["exhausted"],
        )
        self.block = self.order = None
        self._count = not st["counted"]  # re-reading a block must not count its bad records twice

    # -- reading
    def _epoch_shards(self, epoch: int) -> list[int]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            if not self.shuffle:
                order = list(self.my_shards)
            elif self.shard_mode:
                perm = np.random.default_rng([self.seed, self.src_idx, epoch, self.reader]).permutation(
                    len(self.my_shards)
                )
                order = [self.my_shards[i] for i in perm]
            else:  # round-robin: the same order on every reader, so the global index means the same everywhere
                order = [
                    int(i)
                    for i in np.random.default_rng([self.seed, self.src_idx, epoch]).permutation(len(self.my_shards))
                ]
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _load_block(self) -> None:
        shards = self._epoch_shards(self.epoch)
        texts: list[str] = []
        shard_pos, raw, base = self.shard_pos, self.raw_idx, self.global_base
        while shard_pos < len(shards) and len(texts) < self.block_size:
            records = self.source.iter_records(shards[shard_pos], raw)
            last, full = raw - 1, False
            try:
                for rec in records:
                    last = rec.raw_idx
                    if not self.shard_mode and (base + rec.raw_idx) % self.num_readers != self.reader:
                        continue
                    if rec.problem is not None:
                        self._bad(rec.problem, rec.where)
                        continue
                    texts.append(rec.text)
                    if len(texts) == self.block_size:
                        full = True
                        break
            finally:
                records.close()  # release the file of a shard left mid-way
            if full:
                raw = last + 1
            else:  # shard done; `last + 1` is its record count, the same on every reader
                shard_pos, raw, base = shard_pos + 1, 0, base + last + 1
        self._count = True
        self.next_cursor = (shard_pos, raw, base)
        self.block = self.tokenize(texts) if texts else []
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.src_idx, self.reader, self.epoch, self.block_no])
            self.order = rng.permutation(len(self.block))
        else:
            self.order = np.arange(len(self.block))

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
            if not self.block and self.shard_pos == 0 and self.raw_idx == 0 and self.num_epochs is None:
                # A whole epoch without a document: repeating it would loop forever. (A finite pass just ends:
                # a small held-out split may leave some readers empty.)
                raise DataError(
                    f"reader {self.reader} of {self.num_readers} got no documents from source "
                    f"{self.source.config.describe()} ({self.source.split} split, {self.source.num_shards} shards): "
                    "use fewer ranks/workers or more data"
                )
            shard_pos, raw, base = self.next_cursor
            if shard_pos >= len(self._epoch_shards(self.epoch)):  # epoch done
                self.epoch += 1
                shard_pos, raw, base, self.block_no = 0, 0, 0, 0
                self.exhausted = self.num_epochs is not None and self.epoch >= self.num_epochs
            else:
                self.block_no += 1
            self.shard_pos, self.raw_idx, self.global_base, self.idx = shard_pos, raw, base, 0
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


class PackedDataset(IterableDataset):
    """Packed batches (dicts of tensors, see `packing`) for one rank; each worker is one reader."""

    def __init__(
        self, sources: list[Source], config: DataConfig, tokenizer: Any, rank: int, world_size: int, split: str
    ):
        self.sources, self.config, self.tokenizer = sources, config, tokenizer
        self.rank, self.world_size, self.split = rank, world_size, split
        self.num_epochs = config.num_epochs if split == "train" else 1
        self.shuffle = config.shuffle and split == "train"
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self._state: dict[str, Any] | None = None  # after the last yielded batch
        self._resume: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any] | None:
        return self._state if self._state is not None else self._resume

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self._resume = state
        self._state = None

    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        workers = max(self.config.num_workers, 1)
        wid = info.id if info is not None else 0
        if info is not None and info.num_workers != workers:
            raise RuntimeError(f"PackedDataset built for {workers} workers runs under {info.num_workers}")
        return self.rank * workers + wid, self.world_size * workers

    def __iter__(self):
        reader, num_readers = self._reader()
        if get_worker_info() is not None:
            # The loader runs one worker per reader; tokenizers' own thread pool would oversubscribe the cores.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        tokenize = make_tokenize(self.tokenizer)
        readers = []
        for k, src in enumerate(self.sources):
            bad = dict.fromkeys(PROBLEMS, 0)
            args = (self.config, self.num_epochs, self.shuffle, tokenize, bad)
            readers.append(SourceReader(src, k, reader, num_readers, *args))
        stream = DocumentStream(readers, [s.config.weight for s in self.sources], self.config.seed, reader)
        packer = Packer(self.config.seq_len, self.bos_id, self.eos_id, self.pad_id)

        def pull() -> tuple[np.ndarray, Any] | None:
            before = stream.state()
            item = stream.next()
            return None if item is None else (item[0], before)

        resume, self._resume = self._resume, None
        if resume is not None:
            if resume["reader"] != reader:
                raise DataError(f"data state of reader {resume['reader']} was given to reader {reader}")
            if resume["packer"] is not None:
                stream.load_state(resume["packer"]["stream_before"])
                item = stream.next()
                if item is None:
                    raise DataError("the data source ended before the saved position; did its files change?")
                packer.restore(item[0], resume["packer"]["offset"], resume["packer"]["stream_before"])
                if stream.state() != resume["stream"]:
                    raise DataError(
                        "the data no longer matches the saved state (files changed?); cannot resume exactly"
                    )
            else:
                stream.load_state(resume["stream"])
        B = self.config.micro_batch_size
        while True:
            rows = []
            for _ in range(B):
                row = packer.next_row(pull)
                if row is None:
                    break
                rows.append(row)
            if not rows:
                break
            batch = make_batch(rows)  # input_ids, labels, position_ids [b, T]
            self._state = {"reader": reader, "stream": stream.state(), "packer": packer.state_dict()}
            yield batch
            if len(rows) < B:
                break
        bad = {f"{r.source.config.describe()}": {k: v for k, v in r.bad_counts.items() if v} for r in readers}
        logger.info("reader %d/%d finished its %s data; skipped bad records: %s", reader, num_readers, self.split, bad)


class PackedDataLoader:
    """Iterable of batches with `state_dict()` / `load_state_dict()`; wraps torchdata's StatefulDataLoader."""

    def __init__(self, dataset: PackedDataset, meta: dict[str, Any]):
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.dataset, self.meta = dataset, meta
        nw = dataset.config.num_workers
        with warnings.catch_warnings():
            # torchdata 0.11 calls a deprecated torch API in its constructor; the warning says nothing about our data.
            warnings.filterwarnings("ignore", message=".*set_vital.* is deprecated")
            self.loader = StatefulDataLoader(
                dataset, batch_size=None, num_workers=nw, prefetch_factor=4 if nw else None, persistent_workers=False
            )

    def __iter__(self):
        return iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "meta": self.meta, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(f"not a data-pipeline state (expected format {STATE_FORMAT!r})")
        check_meta(state["meta"], self.meta)
        self.loader.load_state_dict(state["loader"])

    def bad_record_counts(self) -> dict[str, int]:
        """Bad records skipped so far by this rank's readers, by problem (for the trainer to log)."""
        total = dict.fromkeys(PROBLEMS, 0)
        for ds_state in _find_key(self.loader.state_dict(), "dataset_state"):
            if ds_state:
                for counts in ds_state["stream"]["bad_records"]:
                    for k, v in counts.items():
                        total[k] += v
        return total


def _find_key(obj: Any, key: str) -> list[Any]:
    """Values under `key` anywhere in a nested dict (StatefulDataLoader's layout differs with and without workers)."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found.extend([v] if k == key else _find_key(v, key))
    return found


def check_meta(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """One clear message when a saved data state cannot resume exactly in this run."""
    if (saved["world_size"], saved["num_workers"]) != (current["world_size"], current["num_workers"]):
        raise DataError(
            f"the data state was saved with world_size={saved['world_size']} x num_workers={saved['num_workers']} "
            f"readers, this run has world_size={current['world_size']} x num_workers={current['num_workers']}. "
            "Documents are dealt to readers by that count, so the position cannot be carried over exactly: "
            "resume with the same world size and data.num_workers, or start the data stream afresh "
            "(skip loading the data state)."
        )
    if saved["rank"] != current["rank"]:
        raise DataError(
            f"the data state of rank {saved['rank']} was loaded on rank {current['rank']}; each rank loads its own"
        )
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        lines = "; ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in diff)
        raise DataError(f"the data settings changed since the state was saved ({lines}); resume with the same settings")


def open_sources(config: DataConfig, split: str = "train") -> list[Source]:
    return [open_source(s, split) for s in config.sources]


def build_dataloader(
    config: DataConfig, tokenizer: Any, rank: int = 0, world_size: int = 1, split: str = "train",
    grad_accum_steps: int = 1,
) -> PackedDataLoader:
    """The packed, sharded, resumable loader of one rank; `split="validation"` gives the held-out data, one pass.
    With data.prepared, the loader over prepared shards in the global order (`prepared`), which needs
    grad_accum_steps to know which rows of a global batch are this rank's micro-batches."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token; packing needs one to separate documents")
    if config.prepared:
        from .prepared import build_prepared_loader

        return build_prepared_loader(config, tokenizer, rank, world_size, split, grad_accum_steps)
    sources = open_sources(config, split)  # every user mistake about the data fails here, before compute
    dataset = PackedDataset(sources, config, tokenizer, rank, world_size, split)
    meta = {
        "rank": rank,
        "world_size": world_size,
        "num_workers": config.num_workers,
        "split": split,
        "sources": [dict(vars(s)) for s in config.sources],
        "num_shards": [s.num_shards for s in sources],
        "seq_len": config.seq_len,
        "micro_batch_size": config.micro_batch_size,
        "shuffle": config.shuffle,
        "shuffle_buffer": config.shuffle_buffer,
        "seed": config.seed,
        "num_epochs": config.num_epochs,
        "tokenizer": {"size": len(tokenizer), "bos": dataset.bos_id, "eos": dataset.eos_id, "pad": dataset.pad_id},
    }
    return PackedDataLoader(dataset, meta)
