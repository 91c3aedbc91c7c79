"""Prepared token shards: tokenise once (`seedlm data prepare`), then train from memory maps in a global order
that does not depend on the world size, the loader workers or gradient accumulation.

A prepared folder::

    manifest.json          format, sources, tokenizer (hash, size, special ids), dtype, shards per split, counts
    train/00000.bin        the tokens of whole documents back to back, uint16 (uint32 above 65536 tokens)
    train/00000.idx.npy    int64 [documents + 1]: where each document starts in the .bin, then the token count
    validation/...         the same for the held-out documents, when the sources have a held-out split

Documents are stored without bos/eos: `packing.Packer` frames and packs them exactly as it does streamed
documents. A shard closes at the first document boundary at or past `shard_tokens` tokens; it is written and
fsynced, and only then listed in the manifest (replaced atomically) with the source position after its last
document, so an interrupted prepare reruns from there and keeps the shards already listed.

Rows. Packing a split's documents in order into rows of T = seq_len tokens gives rows 0..R-1, row i being framed
tokens [i*T, (i+1)*T) of that stream. So any row is built on its own: a binary search finds the document holding
framed token i*T and the Packer fills the row from there. Training uses the R full rows; validation also the
last, padded, one.

Order. Global row g of a run (g = 0, 1, 2, ...) is the k-th row drawn from the set that a seeded, counter-based
sampler picks for g by the sets' weights (always set 0 when there is one set), k counting the earlier global
rows that picked the same set; the set's k-th row is position k % R of a seeded permutation of its R rows for
epoch k // R. Global batch b of a run is global rows [start + b*G, start + (b+1)*G) with
G = micro_batch_size * grad_accum_steps * world_size, and rank r's micro-batch m of that step is its rows
[(r*A + m) * micro_batch_size, ... + micro_batch_size) (A = grad_accum_steps). The rows of a global batch are
therefore the same under any world size, worker count and accumulation with the same G, and the resume state
is one number, the global rows consumed (`start`), which any topology can continue from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import re
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import DataConfig, DataError
from .packing import Packer, make_batch
from .sources import PROBLEMS, open_source

logger = logging.getLogger(__name__)

FORMAT = "seedlm.prepared.v1"
STATE_FORMAT = "seedlm.prepared_state.v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
DEFAULT_SHARD_TOKENS = 64 * 2**20
_BLOCK_DOCS, _BLOCK_CHARS = 256, 1_000_000  # a tokenisation task: this many records or characters, what comes first
_MIX_CHUNK = 65536  # mixture draws come from a counter-based RNG in chunks of this size
VALIDATION_ORDER_SEED = 0  # the validation rows' order: fixed, not the run's seed, so every run evaluates alike
_SHARD_FILE = re.compile(r"^\d{5}\.(bin|idx\.npy)$")


def tokenizer_hash(tokenizer: Any) -> str:
    """A hash of what encodes: the tokenizer's rules and vocabulary (its tokenizer.json as loaded) and its special
    ids. A folder and its re-saved copies (a run's or an export's tokenizer) hash the same."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = [len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256((rules + json.dumps(special)).encode("utf-8")).hexdigest()[:20]


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


# ----------------------------------------------------------------------------- prepare


def prepare(config: DataConfig, tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike,
            num_proc: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS, show_progress: bool = True) -> dict:
    """Tokenise the train (and validation) split of `config.sources` into `out_dir`; returns the manifest.
    A rerun on a folder of the same sources and tokenizer continues where the last one stopped."""
    from .readers import make_tokenize
    from .tokenizer import load_tokenizer

    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if len({s.weight for s in config.sources}) > 1:
        raise DataError("the sources have different weights, but a prepared set keeps no weights: prepare each "
                        "source into its own folder and mix them when training with "
                        "data.prepared=[{path: DIR_A, weight: 0.7}, {path: DIR_B, weight: 0.3}]")
    out = Path(out_dir)
    tok = load_tokenizer(tokenizer_dir)
    identity = {"format": FORMAT, "sources": [dataclasses.asdict(s) for s in config.sources],
                "tokenizer_hash": tokenizer_hash(tok), "dtype": token_dtype(len(tok)), "shard_tokens": shard_tokens}
    manifest = _start_manifest(out, identity)
    manifest["tokenizer"] = {"path": str(Path(tokenizer_dir).resolve()), "size": len(tok), "bos": tok.bos_token_id,
                             "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    if manifest["complete"]:
        logger.info("%s is already prepared (%d tokens)", out, manifest["tokens"])
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    _save_manifest(out, manifest)  # first, so that a rerun recognises the folder as this set's
    num_proc = max(1, num_proc or os.cpu_count() or 1)
    tokenize = make_tokenize(tok) if num_proc == 1 else None
    for split in SPLITS:
        state = manifest["splits"][split]
        if state["complete"]:
            continue
        try:
            sources = [open_source(s, split) for s in config.sources]
        except DataError as err:
            if split == "train":
                raise
            state.update(complete=True, skipped=str(err), tokens=0, documents=0)
            continue
        _prepare_split(out, split, sources, manifest, tokenizer_dir, tokenize, num_proc, config.strict, show_progress)
    train = manifest["splits"]["train"]
    manifest.update(complete=True, tokens=train["tokens"], documents=train["documents"],
                    bad_records=train["bad_records"])
    _save_manifest(out, manifest)
    return manifest


def _start_manifest(out: Path, identity: dict) -> dict:
    """The folder's manifest to continue, or a new one; a folder holding anything else is refused untouched."""
    path = out / MANIFEST
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DataError(f"{out} holds a {MANIFEST} that is not a seedlm prepared set's; nothing was written: "
                            "choose an empty or new OUT_DIR")
        changed = [k for k in identity if manifest.get(k) != identity[k]]
        if changed:
            raise DataError(f"{out} holds a set prepared with other {', '.join(changed)}; nothing was written: "
                            "choose another OUT_DIR, or delete this one to prepare it again")
        return manifest
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"OUT_DIR {out} already holds other files (and no {MANIFEST} of a prepared set); nothing "
                        "was written: choose an empty or new folder")
    splits = {s: {"complete": False, "shards": []} for s in SPLITS}
    return {**identity, "complete": False, "splits": splits}


def _prepare_split(out: Path, split: str, sources: list, manifest: dict, tokenizer_dir, tokenize, num_proc: int,
                   strict: bool, show_progress: bool) -> None:
    from tqdm import tqdm

    state, dtype, shard_tokens = manifest["splits"][split], np.dtype(manifest["dtype"]), manifest["shard_tokens"]
    shards = state["shards"]
    cursor = shards[-1]["next"] if shards else [0, 0, 0]
    bad = dict(shards[-1]["bad_records"]) if shards else dict.fromkeys(PROBLEMS, 0)
    (out / split).mkdir(exist_ok=True)
    listed = {Path(f).name for s in shards for f in (s["bin"], s["index"])}
    for f in (out / split).iterdir():  # what an interrupted run left of a shard it never listed
        if _SHARD_FILE.match(f.name) and f.name not in listed:
            f.unlink()
    done = sum(s["tokens"] for s in shards)
    bar = tqdm(initial=done, unit="tok", unit_scale=True, desc=f"prepare {split}", disable=not show_progress)
    docs: list[np.ndarray] = []
    pending_tokens, last_next = 0, cursor

    def close_shard() -> None:
        nonlocal docs, pending_tokens
        entry = _write_shard(out, split, len(shards), docs, dtype)
        shards.append({**entry, "next": last_next, "bad_records": dict(bad)})
        _save_manifest(out, manifest)
        docs, pending_tokens = [], 0

    records = _records(sources, cursor)
    for items, token_lists in _tokenized_blocks(_blocks(records), tokenizer_dir, tokenize, num_proc, dtype):
        tokens_of = iter(token_lists)
        for _, after, problem, where in items:
            if problem is not None:
                if strict:
                    raise DataError(f"bad record ({problem}) at {where}; strict mode is on: fix the data or set "
                                    "data.strict=false")
                bad[problem] += 1
                continue
            doc = next(tokens_of)
            docs.append(doc)
            pending_tokens += len(doc)
            last_next = after
            bar.update(len(doc))
            if pending_tokens >= shard_tokens:
                close_shard()
    if docs:
        close_shard()
    bar.close()
    if not shards:
        names = ", ".join(s.config.describe() for s in sources)
        if split == "train":
            raise DataError(f"the sources gave no documents to prepare ({names})")
        state["skipped"] = f"no {split} documents in {names}"
    state.update(complete=True, tokens=sum(s["tokens"] for s in shards), documents=sum(s["documents"] for s in shards),
                 bad_records=bad)
    _save_manifest(out, manifest)


def _records(sources: list, cursor: list[int]) -> Iterator[tuple[str | None, list[int], str | None, str]]:
    """(text, position after it, problem, where) of every record from `cursor` = [source, shard, record] on."""
    s0, shard0, raw0 = cursor
    for s in range(s0, len(sources)):
        for shard in range(shard0 if s == s0 else 0, sources[s].num_shards):
            start = raw0 if (s, shard) == (s0, shard0) else 0
            for rec in sources[s].iter_records(shard, start):
                yield rec.text, [s, shard, rec.raw_idx + 1], rec.problem, rec.where


def _blocks(records: Iterator) -> Iterator[list]:
    block, chars = [], 0
    for rec in records:
        block.append(rec)
        chars += len(rec[0] or "")
        if len(block) == _BLOCK_DOCS or chars >= _BLOCK_CHARS:
            yield block
            block, chars = [], 0
    if block:
        yield block


_worker_tokenize = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenize
    from .readers import make_tokenize
    from .tokenizer import load_tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker_tokenize = make_tokenize(load_tokenizer(tokenizer_dir))


def _tokenize_texts(texts: list[str], dtype: np.dtype, tokenize=None) -> list[np.ndarray]:
    return [ids.astype(dtype) for ids in (tokenize or _worker_tokenize)(texts)] if texts else []


def _tokenized_blocks(blocks: Iterator[list], tokenizer_dir, tokenize, num_proc: int, dtype) -> Iterator[tuple]:
    """(block, its good records' tokens) in order; tokenised in this process or in a pool of `num_proc`, with at
    most 2 blocks per process in flight (reading never runs far ahead of writing)."""
    def texts(block):
        return [text for text, _, problem, _ in block if problem is None]

    if num_proc == 1:
        for block in blocks:
            yield block, _tokenize_texts(texts(block), dtype, tokenize)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(num_proc, initializer=_init_worker, initargs=(str(tokenizer_dir),)) as pool:
        in_flight: deque = deque()
        for block in blocks:
            in_flight.append((block, pool.apply_async(_tokenize_texts, (texts(block), dtype))))
            if len(in_flight) >= 2 * num_proc:
                block0, result = in_flight.popleft()
                yield block0, result.get()
        while in_flight:
            block0, result = in_flight.popleft()
            yield block0, result.get()


def _write_shard(out: Path, split: str, n: int, docs: list[np.ndarray], dtype: np.dtype) -> dict:
    tokens = np.concatenate(docs).astype(dtype, copy=False)
    offsets = np.zeros(len(docs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(d) for d in docs])
    bin_rel, index_rel = f"{split}/{n:05d}.bin", f"{split}/{n:05d}.idx.npy"
    index = io.BytesIO()
    np.save(index, offsets)
    _write_synced(out / bin_rel, tokens.tobytes())
    _write_synced(out / index_rel, index.getvalue())
    return {"bin": bin_rel, "index": index_rel, "tokens": int(len(tokens)), "documents": len(docs),
            "max_token_id": int(tokens.max()) if len(tokens) else -1}


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_manifest(out: Path, manifest: dict) -> None:
    """Atomically: the old manifest stays whole until the new one has replaced it."""
    tmp = out / f"{MANIFEST}.tmp"
    _write_synced(tmp, (json.dumps(manifest, indent=1) + "\n").encode())
    os.replace(tmp, out / MANIFEST)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- implicit cache


def local_cache_dir(config: DataConfig, tokenizer: Any) -> Path:
    """The cache folder of `config.sources` prepared with `tokenizer`: keyed by the sources, every file's path,
    size and modification time, and the tokenizer's hash ($SEEDLM_DATA_CACHE, default ~/.cache/seedlm/prepared)."""
    from .sources import list_files

    files = []
    for source in config.sources:
        root, rels = list_files(source)
        files.append([(rel, (root / rel).stat().st_size, (root / rel).stat().st_mtime_ns) for rel in rels])
    key = json.dumps([[dataclasses.asdict(s) for s in config.sources], files, tokenizer_hash(tokenizer)])
    root = Path(os.environ.get("SEEDLM_DATA_CACHE", Path.home() / ".cache" / "seedlm" / "prepared"))
    return root / hashlib.sha256(key.encode()).hexdigest()[:20]


def with_local_cache(config: DataConfig, tokenizer: Any) -> DataConfig:
    """`config` reading its local sources from the implicit cache (data.prepare_local), prepared first when the
    cache lacks them (rank 0 when torch.distributed runs; the others wait). Hub sources are streamed as before."""
    if not config.prepare_local or config.prepared or any(s.kind == "hub" for s in config.sources):
        return config
    tokenizer_dir = config.tokenizer or getattr(tokenizer, "name_or_path", None)
    if not tokenizer_dir or not Path(tokenizer_dir).is_dir():
        raise DataError("data.prepare_local needs the tokenizer's folder (data.tokenizer) to prepare the sources "
                        "with; set it, or set prepare_local: false")
    out = local_cache_dir(config, tokenizer)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        # a complete set returns at once; an interrupted one continues
        prepare(config, tokenizer_dir, out, num_proc=1 if distributed else None, show_progress=False)
    if distributed:
        torch.distributed.barrier()
    return dataclasses.replace(config, prepared=[{"path": str(out), "weight": 1.0}])


# ----------------------------------------------------------------------------- read


def read_manifest(path: str | os.PathLike) -> dict:
    folder = Path(path)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise DataError(f"data.prepared={str(path)!r}: no {MANIFEST} there; make the set with "
                        f"`seedlm data prepare CONFIG {path} tokenizer.path=TOKENIZER`") from None
    except ValueError as err:
        raise DataError(f"data.prepared={str(path)!r}: {MANIFEST} is not valid JSON ({err}); prepare it "
                        "again") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"data.prepared={str(path)!r}: {MANIFEST} has format {manifest.get('format')!r}, this "
                        f"version reads {FORMAT!r}; prepare it again")
    if not manifest.get("complete"):
        raise DataError(f"data.prepared={str(path)!r} is not finished (an interrupted prepare?): rerun "
                        f"`seedlm data prepare` with the same arguments; it continues where it stopped")
    return manifest


class PreparedSplit:
    """One split of a prepared folder, checked against its manifest, read through memory maps (opened lazily, in
    each loader worker on its own)."""

    def __init__(self, path: str | os.PathLike, split: str, manifest: dict | None = None):
        self.path, self.split = Path(path), split
        self.manifest = manifest or read_manifest(path)
        state = self.manifest["splits"][split]
        if state.get("skipped"):
            raise DataError(f"data.prepared={str(path)!r} has no {split} split ({state['skipped']})")
        self.shards, self.dtype = state["shards"], np.dtype(self.manifest["dtype"])
        offsets = [self._check_shard(shard) for shard in self.shards]
        self.doc_start = np.concatenate([o[:-1] for o in offsets])  # [D] start of each document in its shard's .bin
        self.doc_len = np.concatenate([np.diff(o) for o in offsets])  # [D]
        self.shard_first_doc = np.cumsum([0] + [s["documents"] for s in self.shards])  # [S + 1]
        self.max_token_id = max(s["max_token_id"] for s in self.shards)
        self._maps: dict[int, np.ndarray] = {}
        self.seq_len = 0

    def _check_shard(self, shard: dict) -> np.ndarray:
        """The shard's document offsets, after checking that both files are there with the manifest's sizes."""
        where = f"data.prepared={str(self.path)!r}:"
        fix = "prepare the set again (seedlm data prepare reruns only what is missing)"
        bin_path, index_path = self.path / shard["bin"], self.path / shard["index"]
        if not bin_path.is_file() or not index_path.is_file():
            missing = bin_path if not bin_path.is_file() else index_path
            raise DataError(f"{where} {missing} is missing; {fix}")
        expected = shard["tokens"] * self.dtype.itemsize
        if bin_path.stat().st_size != expected:
            raise DataError(f"{where} {bin_path} has {bin_path.stat().st_size} bytes, the manifest says {expected} "
                            f"({shard['tokens']} {self.dtype} tokens): the shard is corrupt or truncated; {fix}")
        try:
            offsets = np.load(index_path, mmap_mode="r")
            ok = offsets.dtype == np.int64 and offsets.shape == (shard["documents"] + 1,)
            ok = ok and offsets[0] == 0 and offsets[-1] == shard["tokens"] and bool(np.all(np.diff(offsets) >= 0))
        except (ValueError, OSError, EOFError):
            ok = False
        if not ok:
            raise DataError(f"{where} the index {index_path} does not match the manifest ({shard['documents']} "
                            f"documents, {shard['tokens']} tokens): it is corrupt; {fix}")
        return np.asarray(offsets)

    def set_framing(self, seq_len: int, bos_id: int | None, eos_id: int, pad_id: int, vocab_size: int) -> None:
        """Rows of seq_len tokens, documents framed as the packer frames them: [bos] + tokens + [eos]."""
        self.seq_len, self.bos_id, self.eos_id, self.pad_id = seq_len, bos_id, eos_id, pad_id
        self.vocab_size = vocab_size
        self.head = 1 if bos_id is not None else 0
        self.framed_end = np.cumsum(self.doc_len + self.head + 1)  # [D] end of each framed document in the stream

    def num_rows(self, padded_last: bool = False) -> int:
        total = int(self.framed_end[-1])
        return -(-total // self.seq_len) if padded_last else total // self.seq_len

    def _tokens(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.path / self.shards[shard]["bin"], dtype=self.dtype, mode="r")
        return self._maps[shard]

    def _doc_tokens(self, d: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of document d (cut at its end). A row never needs more of a document than its own
        length, so the packer is handed that window: its eos is then only real where the document really ends."""
        shard = int(np.searchsorted(self.shard_first_doc, d, side="right")) - 1
        first = int(self.doc_start[d])
        return np.asarray(self._tokens(shard)[first + start : first + min(stop, int(self.doc_len[d]))])

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Row i of the packed stream (packing.Packer.next_row's tuple), built from the document holding framed
        token i * seq_len onwards."""
        T, start = self.seq_len, i * self.seq_len
        d = int(np.searchsorted(self.framed_end, start, side="right"))
        offset = start - (int(self.framed_end[d - 1]) if d else 0)  # framed tokens of document d before the row
        cut = max(0, offset - self.head)  # its tokens the row does not need
        packer = Packer(T, self.bos_id, self.eos_id, self.pad_id)
        packer.restore(self._doc_tokens(d, cut, offset - self.head + T), offset - cut, None)
        following = itertools.count(d + 1)

        def pull() -> tuple[np.ndarray, None] | None:
            n = next(following)
            return (self._doc_tokens(n, 0, T), None) if n < len(self.doc_len) else None

        row = packer.next_row(pull)
        if int(row[0].max()) >= self.vocab_size:
            raise DataError(f"data.prepared={str(self.path)!r}: row {i} ({self.split}) holds token id "
                            f"{int(row[0].max())}, outside the tokenizer's {self.vocab_size} tokens: a shard near "
                            f"document {d} is corrupt; prepare the set again")
        return row

    def __getstate__(self) -> dict:  # loader workers open their own memory maps
        return {**self.__dict__, "_maps": {}}


def prepared_splits(config: DataConfig, split: str) -> list[PreparedSplit]:
    """The split of every set in data.prepared, files checked against the manifests (no tokenizer needed)."""
    return [PreparedSplit(p["path"], split) for p in config.prepared]


def check_prepared_run(config: DataConfig, tokenizer_path: str | None, needs_validation: bool) -> None:
    """A run's data.prepared before anything is built: every set complete and whole, a tokenizer named, and a
    validation split when the run evaluates."""
    sets = prepared_splits(config, "train")
    if not tokenizer_path:
        used = sets[0].manifest["tokenizer"]["path"]
        raise DataError(f"data.prepared needs the tokenizer the data was prepared with: set tokenizer.path={used} "
                        "(the path in its manifest); the run would otherwise train a new one")
    if needs_validation and not any(not m.manifest["splits"]["validation"].get("skipped") for m in sets):
        raise DataError(f"data.prepared has no validation split ({sets[0].manifest['splits']['validation']['skipped']}"
                        "): set train.eval_interval=0, or prepare sources with a held-out split (holdout_fraction)")


class GlobalOrder:
    """Global row g -> (set, row of that set): see the module docstring. Walks forward cheaply; a jump backwards
    recounts from row 0 (vectorised, a chunk of draws at a time)."""

    def __init__(self, num_rows: list[int], weights: list[float], seed: int):
        self.num_rows, self.seed = num_rows, seed
        w = np.asarray(weights, np.float64)
        self.probs = w / w.sum()
        self._chunk: tuple[int, np.ndarray] | None = None
        self._perm: dict[int, tuple[int, np.ndarray]] = {}
        self._at, self._counts = 0, np.zeros(len(num_rows), np.int64)  # rows before global row _at, per set

    def _choices(self, chunk: int) -> np.ndarray:
        if len(self.probs) == 1:
            return np.zeros(_MIX_CHUNK, np.int64)
        if self._chunk is None or self._chunk[0] != chunk:
            rng = np.random.default_rng([self.seed, 0x5EED, chunk])
            self._chunk = (chunk, rng.choice(len(self.probs), size=_MIX_CHUNK, p=self.probs))
        return self._chunk[1]

    def _advance(self, to: int) -> None:
        if to < self._at:
            self._at, self._counts = 0, np.zeros_like(self._counts)
        while self._at < to:
            chunk, pos = divmod(self._at, _MIX_CHUNK)
            take = min(_MIX_CHUNK - pos, to - self._at)
            self._counts += np.bincount(self._choices(chunk)[pos : pos + take], minlength=len(self.probs))
            self._at += take

    def _permuted(self, s: int, k: int) -> int:
        epoch, pos = divmod(k, self.num_rows[s])
        if self._perm.get(s, (None,))[0] != epoch:
            self._perm[s] = (epoch, np.random.default_rng([self.seed, s, epoch]).permutation(self.num_rows[s]))
        return int(self._perm[s][1][pos])

    def rows(self, start: int, count: int) -> list[tuple[int, int]]:
        self._advance(start)
        out = []
        for g in range(start, start + count):
            s = int(self._choices(g // _MIX_CHUNK)[g % _MIX_CHUNK])
            out.append((s, self._permuted(s, int(self._counts[s]))))
            self._counts[s] += 1
            self._at += 1
        return out


class _Forever(Sampler):
    def __iter__(self):
        return itertools.count()


class RankBatches(Dataset):
    """Micro-batch i of one rank, counted from global row `start` (map-style: any worker builds any index)."""

    def __init__(self, sets: list[PreparedSplit], order: GlobalOrder, micro: int, accum: int, rank: int,
                 world_size: int, start: int):
        self.sets, self.order, self.micro, self.accum, self.rank, self.start = sets, order, micro, accum, rank, start
        self.global_batch = micro * accum * world_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        step, m = divmod(i, self.accum)
        first = self.start + step * self.global_batch + (self.rank * self.accum + m) * self.micro
        return make_batch([self.sets[s].row(r) for s, r in self.order.rows(first, self.micro)])


class PreparedLoader:
    """The loader interface of `build_dataloader` (iteration, state_dict, load_state_dict, bad_record_counts) over
    prepared sets. Training: endless, in the global order; validation: one pass over rank r's rows r, r + W, ..."""

    def __init__(self, sets: list[PreparedSplit], weights: list[float], config: DataConfig, rank: int,
                 world_size: int, grad_accum_steps: int, split: str):
        self.sets, self.weights, self.config, self.split = sets, weights, config, split
        self.rank, self.world_size, self.accum = rank, world_size, grad_accum_steps
        self.global_batch = config.micro_batch_size * grad_accum_steps * world_size
        self.start, self.taken = 0, 0  # global rows consumed before this iteration; micro-batches taken since
        self.meta = {"seq_len": config.seq_len, "seed": config.seed,
                     "sets": [{"tokenizer_hash": s.manifest["tokenizer_hash"], "tokens": s.manifest["tokens"],
                               "documents": s.manifest["documents"], "weight": w} for s, w in zip(sets, weights)]}

    def rows_consumed(self) -> int:
        """Global rows of the whole steps taken (a partial step's micro-batches are read again after a resume)."""
        return self.start + (self.taken // self.accum) * self.global_batch

    def __iter__(self):
        if self.split == "validation":
            yield from self._validation()
            return
        self.start, self.taken = self.rows_consumed(), 0
        order = GlobalOrder([s.num_rows() for s in self.sets], self.weights, self.config.seed)
        dataset = RankBatches(self.sets, order, self.config.micro_batch_size, self.accum, self.rank,
                              self.world_size, self.start)
        workers = self.config.num_workers
        loader = DataLoader(dataset, batch_size=None, sampler=_Forever(), num_workers=workers,
                            prefetch_factor=4 if workers else None)
        for batch in loader:
            self.taken += 1  # before yielding: state_dict() after a batch is taken points past it
            yield batch

    def _validation(self):
        """One pass over every validation row in a fixed shuffled order, rank r taking rows r, r + W, ... of it:
        the first eval_batches are a sample of the whole split (in document order they were its first documents
        only), the same rows for every run seed, and the same set of rows for any world size at one global batch."""
        rows = [(k, r) for k, s in enumerate(self.sets) for r in range(s.num_rows(padded_last=True))]
        order = np.random.default_rng(VALIDATION_ORDER_SEED).permutation(len(rows))
        mine = [rows[i] for i in order[self.rank :: self.world_size]]
        B = self.config.micro_batch_size
        for first in range(0, len(mine), B):
            yield make_batch([self.sets[k].row(r) for k, r in mine[first : first + B]])

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "rows_consumed": self.rows_consumed(), "meta": self.meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError("the saved data position is not from prepared data (it was saved by a run that streamed "
                            "data.sources); positions in a stream do not translate into rows of a prepared set: "
                            "resume with the data settings that run had, or start a new run with data.prepared")
        diff = sorted(k for k in set(state["meta"]) | set(self.meta) if state["meta"].get(k) != self.meta.get(k))
        if diff:
            lines = "; ".join(f"{k}: saved {state['meta'].get(k)!r}, now {self.meta.get(k)!r}" for k in diff)
            raise DataError(f"the prepared data changed since the state was saved ({lines}); resume with the same "
                            "data.prepared, seq_len and seed")
        self.start, self.taken = int(state["rows_consumed"]), 0

    def bad_record_counts(self) -> dict[str, int]:
        """Records skipped while preparing (none are skipped while reading)."""
        total = dict.fromkeys(PROBLEMS, 0)
        for s in self.sets:
            for k, v in s.manifest["bad_records"].items():
                total[k] += v
        return total


def build_prepared_loader(config: DataConfig, tokenizer: Any, rank: int = 0, world_size: int = 1,
                          split: str = "train", grad_accum_steps: int = 1) -> PreparedLoader:
    """The loader of one rank over data.prepared; every mismatch with the run is a DataError here, before compute."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    run_hash = tokenizer_hash(tokenizer)
    weights, sets = [], []
    for spec in config.prepared:
        manifest = read_manifest(spec["path"])
        if manifest["tokenizer_hash"] != run_hash:
            raise DataError(f"data.prepared={spec['path']!r} was tokenised with another tokenizer (hash "
                            f"{manifest['tokenizer_hash']}, from {manifest['tokenizer']['path']}) than this run's "
                            f"(hash {run_hash}): set tokenizer.path={manifest['tokenizer']['path']}, or prepare "
                            "the data again with this tokenizer")
        if manifest["splits"][split].get("skipped"):
            continue  # validation rows come from the sets that have them (check_prepared_run: at least one)
        s = PreparedSplit(spec["path"], split, manifest)
        if s.max_token_id >= len(tokenizer):
            raise DataError(f"data.prepared={spec['path']!r} holds token id {s.max_token_id}, outside the "
                            f"tokenizer's (and so the model's) vocabulary of {len(tokenizer)}: prepare it again")
        s.set_framing(config.seq_len, tokenizer.bos_token_id, eos, pad, len(tokenizer))
        sets.append(s)
        weights.append(spec["weight"])
    if not sets:
        raise DataError(f"no set in data.prepared has a {split} split")
    global_batch = config.micro_batch_size * grad_accum_steps * world_size
    rows = sum(s.num_rows() for s in sets)
    if split == "train" and (rows < global_batch or min(s.num_rows() for s in sets) < 1):
        raise DataError(f"data.prepared holds {rows} rows of seq_len {config.seq_len} ({[s.num_rows() for s in sets]}"
                        f" per set), fewer than one global batch of {global_batch} rows (micro_batch_size "
                        f"{config.micro_batch_size} x grad_accum_steps {grad_accum_steps} x world size "
                        f"{world_size}): prepare more data, or lower seq_len or the batch")
    return PreparedLoader(sets, weights, config, rank, world_size, grad_accum_steps, split)
