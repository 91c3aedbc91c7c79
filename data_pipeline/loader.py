"""Sharding, mixing, shuffling and resumable state: sources -> per-reader document streams -> packed batches.

Readers and order (readers.py): every (data-parallel rank, DataLoader worker) pair is one reader; no record
is read by two readers, and each reader visits its shards and blocks of documents in a seeded order. The
documents are packed into rows by `data.packing_lanes` packers side by side, a row from each in turn
(packing.LanePacker).

State. A reader's position is a few integers per source (epoch, piece, the record key at the block's
start, block number, index in the block), the sampler's draw count, and each lane's pending
document (the stream position before it was drawn, plus how many of its tokens are already packed).
Restoring seeks to the block's start (a row group, a byte offset) and re-reads and re-tokenises that
block (once for all the lanes' documents in it), then continues exactly: a resumed run yields the same
batches, token for token, as the uninterrupted one. torchdata's `StatefulDataLoader` carries each
worker's state with every batch and knows which worker is next.

Another topology. Keys do not depend on who reads them, so every reader's state together says which
records of which epochs were consumed (`portable_position`); the readers of another world size or
worker count start at the earliest epoch and skip those records (`PackedDataLoader.load_state_dicts`).
A document pending in a lane counts as consumed: the rest of it is dropped, never read twice.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .config import DataConfig, DataError
from .packing import LanePacker, make_batch
from .readers import DocumentStream, SourceReader, make_tokenize
from .sources import PROBLEMS, Source, open_source

logger = logging.getLogger(__name__)

STATE_FORMAT = "seedlm.data_pipeline.v2"  # v2: positions are (piece, key)


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
        self._portable: dict[str, Any] | None = None  # a position saved under another topology

    def state_dict(self) -> dict[str, Any] | None:
        return self._state if self._state is not None else self._resume

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self._resume, self._portable = state, None
        self._state = None

    def load_portable(self, portable: dict[str, Any]) -> None:
        self._resume, self._portable, self._state = None, portable, None

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
        packer = LanePacker(self.config.lanes(), self.config.seq_len, self.bos_id, self.eos_id, self.pad_id)

        def pull() -> tuple[np.ndarray, Any] | None:
            before = stream.state()
            item = stream.next()
            return None if item is None else (item[0], before)

        resume, self._resume = self._resume, None
        if self._portable is not None:
            resume, self._portable = _start_from_portable(self._portable, reader, self.num_epochs), None
        if resume is not None:
            if resume["reader"] != reader:
                raise DataError(f"data state of reader {resume['reader']} was given to reader {reader}")
            lanes, packer.next_lane = LanePacker.lane_states(resume["packer"])
            pending = sorted((saved["stream_before"]["draw"], lane) for lane, saved in enumerate(lanes) if saved)
            for _, lane in pending:  # each lane's pending document drawn again, in stream order (blocks read once)
                saved = lanes[lane]
                stream.load_state(saved["stream_before"])
                item = stream.next()
                if item is None:
                    raise DataError("the data source ended before the saved position; did its files change?")
                try:
                    packer.restore_lane(lane, item[0], saved["offset"], saved["stream_before"])
                except ValueError as err:
                    raise DataError(f"the data no longer matches the saved state (files changed?): {err}; "
                                    "cannot resume exactly") from err
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

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Resume from the data states that EVERY rank of the saved run wrote (in rank order). Under the same
        world size and num_workers this is `load_state_dict(states[rank])`, exact to the token; under another
        one the readers continue from `portable_position`: no document is read twice or skipped (a document
        cut by the save is counted as read: the rest of it is not trained on)."""
        for st in states:
            if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
                raise DataError(f"not a data-pipeline state (expected format {STATE_FORMAT!r}); a state saved by an "
                                "older seedlm cannot move to another topology: resume with the world size and "
                                "data.num_workers it was saved with")
        saved = states[0]["meta"]
        if (saved["world_size"], saved["num_workers"]) == (self.meta["world_size"], self.meta["num_workers"]):
            self.load_state_dict(states[self.meta["rank"]])
            return
        problem = topology_change_problem(saved, self.meta)
        if problem:
            raise DataError(problem)
        if len(states) != saved["world_size"]:
            raise DataError(f"{len(states)} data states were given, but the run that saved them had world_size="
                            f"{saved['world_size']}: pass every rank's state, in rank order")
        self.dataset.load_portable(portable_position(states, self.dataset.sources, self.dataset.config,
                                                     self.dataset.num_epochs, self.dataset.shuffle))

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


_TOPOLOGY_KEYS = ("rank", "world_size", "num_workers")


def topology_change_problem(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why a streaming data state saved under one world size / num_workers cannot continue under this run's
    (None: it can, through `PackedDataLoader.load_state_dicts`). `saved` and `current` are the loaders' `meta`."""
    diff = sorted(k for k in set(saved) | set(current) if k not in _TOPOLOGY_KEYS and saved.get(k) != current.get(k))
    if diff == ["num_shards"]:
        return (f"the sources have {current['num_shards']} shards in this run, {saved['num_shards']} when the data "
                "state was saved (a Hub dataset with fewer data files than readers is split by row group): the "
                "position cannot be carried over; resume with the saved world size and data.num_workers")
    if diff:
        lines = "; ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in diff)
        return f"the data settings changed since the state was saved ({lines}); resume with the same settings"
    return None


def can_change_topology(state: Any) -> bool:
    """Whether a saved loader state (streaming or prepared) can resume under another world size or num_workers.
    The trainer then gathers every rank's saved state and calls `load_state_dicts(states)` (streaming) or
    `load_state_dict(states[0])` (prepared data: the state is global rows consumed, the same on every rank)."""
    from .prepared import STATE_FORMAT as PREPARED_FORMAT

    return isinstance(state, dict) and state.get("format") in (STATE_FORMAT, PREPARED_FORMAT)


def portable_position(states: list[dict[str, Any]], sources: list[Source], config: DataConfig,
                      num_epochs: int | None, shuffle: bool) -> dict[str, Any]:
    """A topology-free position from every reader's state: per source, the earliest epoch any reader is in and
    the [epoch, shard, start, stop] key intervals consumed from it on (each reader's current block is read once
    more, not tokenised, to learn which of its documents were drawn)."""
    readers = [ds for st in states for ds in _find_key(st["loader"], "dataset_state") if ds]
    meta = states[0]["meta"]
    num_readers = meta["world_size"] * max(meta["num_workers"], 1)
    out = {"sources": [], "bad_records": []}
    for k, src in enumerate(sources):
        positions = {ds["reader"]: ds["stream"]["sources"][k] for ds in readers}
        # a reader that never yielded a batch consumed nothing: it is at the start of epoch 0
        floor = min([positions.get(r, {"epoch": 0})["epoch"] for r in range(num_readers)])
        consumed = []
        for r, pos in positions.items():
            reader = SourceReader(src, k, r, num_readers, config, num_epochs, shuffle, None,
                                  dict.fromkeys(PROBLEMS, 0))
            reader.load_state(pos)
            consumed += reader.consumed(floor)
        out["sources"].append({"epoch": floor, "skip": _merge(consumed)})
        bad = dict.fromkeys(PROBLEMS, 0)
        for ds in readers:
            for problem, n in ds["stream"]["bad_records"][k].items():
                bad[problem] += n
        out["bad_records"].append(bad)
    return out


def _merge(intervals: list[list[int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for epoch, shard, a, b in sorted(intervals):
        if merged and merged[-1][:2] == [epoch, shard] and a <= merged[-1][3]:
            merged[-1][3] = max(merged[-1][3], b)
        else:
            merged.append([epoch, shard, a, b])
    return merged


def _start_from_portable(portable: dict[str, Any], reader: int, num_epochs: int | None) -> dict[str, Any]:
    """The state a reader of the new topology starts from: the earliest epoch, skipping what was consumed."""
    sources = [{"epoch": p["epoch"], "piece_pos": 0, "key": 0, "block_no": 0, "idx": 0, "counted": False,
                "exhausted": num_epochs is not None and p["epoch"] >= num_epochs, "skip": p["skip"]}
               for p in portable["sources"]]
    bad = [dict(b) if reader == 0 else dict.fromkeys(b, 0) for b in portable["bad_records"]]  # counted once
    return {"reader": reader, "stream": {"draw": 0, "sources": sources, "bad_records": bad}, "packer": None}


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
        hint = (" (a state saved before data.packing_lanes existed packed with one lane: set data.packing_lanes=1)"
                if "packing_lanes" in diff and "packing_lanes" not in saved else "")
        raise DataError(f"the data settings changed since the state was saved ({lines}); resume with the same "
                        f"settings{hint}")


def open_sources(config: DataConfig, split: str = "train", num_readers: int = 1) -> list[Source]:
    return [open_source(s, split, num_readers) for s in config.sources]


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
    if config.prepare_local:
        from .prepared import with_local_cache

        config = with_local_cache(config, tokenizer)
    if config.prepared:
        from .prepared import build_prepared_loader

        return build_prepared_loader(config, tokenizer, rank, world_size, split, grad_accum_steps)
    num_readers = world_size * max(config.num_workers, 1)
    sources = open_sources(config, split, num_readers)  # every user mistake about the data fails here
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
        **({"packing_lanes": config.lanes()} if config.lanes() != 1 else {}),  # states saved before lanes had one
        "seed": config.seed,
        "num_epochs": config.num_epochs,
        "tokenizer": {"size": len(tokenizer), "bos": dataset.bos_id, "eos": dataset.eos_id, "pad": dataset.pad_id},
    }
    return PackedDataLoader(dataset, meta)
