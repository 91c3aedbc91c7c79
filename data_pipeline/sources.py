"""Text sources: a list of shards, and the records of one shard read from a given record index.

A source is opened once in the main process (`open_source`), which checks everything a user can get
wrong (no files matching a glob, unknown dataset, split, config or text field) and raises one
`DataError` before training starts. The opened source is then pickled into the loader workers.

Every record has a key, `raw_idx`: where it is in its shard, counted over every record, good or bad: the row
index for Parquet and Hub shards, the byte offset of its first line for jsonl and text, 0 for a one-document
file. Keys increase through a shard and do not depend on who reads it, so the loader's position is
(shard, key), and reading a shard's keys [start, stop) is the only seek a source needs: whole row groups and
bytes before `start` are never read. `split_points` cuts a shard into pieces for readers that share it
(Parquet row groups, byte ranges of jsonl and text). Bad records (malformed JSON, missing text field, empty
or binary files) are yielded with a `problem` instead of text; the loader counts and skips them, or raises in
strict mode.

Local files are read by the small readers below rather than through `datasets`' json/text builders:
those fail the whole stream on one malformed line, while a pretraining run should skip and count it.
Hub datasets (and local dataset folders passed as kind "hub") go through
`datasets.load_dataset(..., streaming=True)`, one `IterableDataset.shard` per shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DataError, SourceConfig

# Problems a record can have; the loader counts them per source under these names.
PROBLEMS = ("malformed_json", "missing_field", "empty", "binary", "undecodable")

_DEFAULT_GLOB = {
    "jsonl": "**/*.jsonl",
    "parquet": "**/*.parquet",
    "text": "**/*.txt",
    "files": "**/*",
    "stdlib": "**/*.py",
}
_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a file as binary (as git and grep do)


@dataclass
class Record:
    raw_idx: int  # index of the record in its shard, counting bad records too
    text: str | None  # None when `problem` is set
    problem: str | None = None
    where: str = ""  # file:line or shard:index, for messages


def is_heldout(key: str, fraction: float) -> bool:
    """Stable (process- and machine-independent) split of documents by a hash of their key."""
    if fraction <= 0.0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


class Source:
    """An opened source for one split ("train" or "validation")."""

    config: SourceConfig
    split: str
    num_shards: int

    def iter_records(self, shard: int, start: int, stop: int | None = None) -> Iterator[Record]:
        """The records of a shard whose key is in [start, stop) (stop None: to the shard's end)."""
        raise NotImplementedError

    def split_points(self, shard: int, parts: int) -> list[int]:
        """Keys where up to `parts` pieces of the shard start, the first 0 ([0]: the shard cannot be split)."""
        return [0]

    def _wants(self, key: str) -> bool:
        """Whether the record with this key belongs to this source's split."""
        return is_heldout(key, self.config.holdout_fraction) == (self.split == "validation")


def open_source(config: SourceConfig, split: str = "train", num_readers: int = 1) -> Source:
    """Open and check a source; every user mistake becomes one DataError here. `num_readers`: how many readers
    will share it (a Hub dataset with fewer data files is split by Parquet row group)."""
    if split not in ("train", "validation"):
        raise DataError(f"split must be 'train' or 'validation', got {split!r}")
    if config.kind == "hub":
        return HubSource(config, split, num_readers)
    return LocalSource(config, split)


# ----------------------------------------------------------------------------- local files


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def list_files(config: SourceConfig) -> tuple[Path, list[str]]:
    """(root, sorted relative paths) of the files a local source reads."""
    path = Path(os.path.expanduser(config.path))
    if path.is_dir():
        root = path
        pattern = config.glob or _DEFAULT_GLOB[config.kind]
        files = list(root.glob(pattern))
    elif _has_magic(str(path)):
        parts = path.parts
        n = next(i for i, p in enumerate(parts) if _has_magic(p))
        root = Path(*parts[:n]) if n else Path(".")
        files = list(root.glob(str(Path(*parts[n:]))))
    elif path.is_file():
        root = path.parent
        files = [path]
    else:
        raise DataError(f"source {config.describe()}: {path} does not exist; give an existing file, folder or glob")
    excluded = set(config.exclude)
    rels = sorted(
        f.relative_to(root).as_posix()
        for f in files
        if f.is_file() and not excluded.intersection(f.relative_to(root).parts)
    )
    if not rels:
        pattern = (config.glob or _DEFAULT_GLOB[config.kind]) if path.is_dir() else str(path)
        raise DataError(f"source {config.describe()}: no files match {pattern!r} under {root}; check `path` and `glob`")
    return root, rels


def _missing_field(config: SourceConfig, what: str, present: str) -> str:
    """The message for a text field the source does not have: what is there, and the option that picks it."""
    return (f"source {config.describe()}: {what}; {present}. Set the source's text_field to the one holding the "
            "text (text_field: NAME in the config's source mapping, --text-field NAME on the command line)")


def _sniff_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_SNIFF_BYTES)


class LocalSource(Source):
    """jsonl, parquet, text, or a folder of files (one document per file); one shard per file."""

    def __init__(self, config: SourceConfig, split: str):
        self.config, self.split = config, split
        if split == "validation" and config.holdout_fraction <= 0:
            raise DataError(
                f"source {config.describe()} has no held-out split; set holdout_fraction (e.g. 0.01) to hold out "
                "documents for validation"
            )
        self.root, rels = list_files(config)
        self.one_doc_per_file = config.kind in ("files", "stdlib") or (
            config.kind == "text" and config.sample_by == "document"
        )
        if self.one_doc_per_file:
            # Split whole files up front, so each reader lists only the files of its split.
            rels = [r for r in rels if self._wants(r)]
            if not rels:
                raise DataError(
                    f"source {config.describe()}: no files fall in the {split} split; lower holdout_fraction?"
                )
        self.files = rels
        self.num_shards = len(rels)
        self._check_text_field()

    def _check_text_field(self) -> None:
        """An unknown text field fails here, once, rather than as millions of skipped records."""
        field, first = self.config.text_field, self.root / self.files[0]
        if self.config.kind == "parquet":
            import pyarrow.parquet as pq

            names = pq.ParquetFile(first).schema_arrow.names
            if field not in names:
                raise DataError(_missing_field(self.config, f"column {field!r} not in {first}", f"columns: {names}"))
        elif self.config.kind == "jsonl" and not _sniff_binary(first):
            keys: set[str] = set()
            with open(first, encoding="utf-8", errors="replace") as f:
                for i, line in enumerate(f):
                    if i >= 100:
                        break
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(obj, dict):
                        if field in obj:
                            return
                        keys.update(obj)
            if keys:
                raise DataError(_missing_field(
                    self.config, f"text field {field!r} not found in the first records of {first}",
                    f"keys seen: {sorted(keys)}",
                ))

    def split_points(self, shard: int, parts: int) -> list[int]:
        """Keys where up to `parts` pieces of the shard start (the first is 0), for readers that share a shard:
        Parquet row groups, or equal byte ranges of jsonl and text (a piece owns the records that START in it)."""
        path = self.root / self.files[shard]
        if parts <= 1 or self.one_doc_per_file:
            return [0]
        if self.config.kind == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            rows = [0]
            for rg in range(meta.num_row_groups):
                rows.append(rows[-1] + meta.row_group(rg).num_rows)
            groups = meta.num_row_groups
            return sorted({rows[groups * j // parts] for j in range(parts)})
        size = path.stat().st_size
        return sorted({size * j // parts for j in range(parts)})

    def iter_records(self, shard: int, start: int, stop: int | None = None) -> Iterator[Record]:
        rel = self.files[shard]
        path = self.root / rel
        kind = self.config.kind
        if kind == "parquet":
            yield from self._iter_parquet(path, rel, start, stop)
            return
        if _sniff_binary(path):
            if start == 0:
                yield Record(0, None, "binary", str(path))
            return
        if self.one_doc_per_file:
            if start > 0:
                return
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                yield Record(0, None, "undecodable", str(path))
                return
            yield Record(0, text, None if text.strip() else "empty", str(path))
        elif kind == "jsonl":
            yield from self._iter_jsonl(path, rel, start, stop)
        else:
            yield from self._iter_text(path, rel, start, stop)

    def _iter_jsonl(self, path: Path, rel: str, start: int, stop: int | None) -> Iterator[Record]:
        field = self.config.text_field
        for pos, line, where in _lines(path, start, stop):
            if not line.strip() or not self._wants_rec(rel, pos):
                continue  # a blank line (not a record), or a record of the other split
            try:
                obj = json.loads(line)
            except UnicodeDecodeError:
                yield Record(pos, None, "undecodable", where)
                continue
            except json.JSONDecodeError:
                yield Record(pos, None, "malformed_json", where)
                continue
            text = obj.get(field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                yield Record(pos, None, "missing_field", where)
            elif not text.strip():
                yield Record(pos, None, "empty", where)
            else:
                yield Record(pos, text, None, where)

    def _iter_text(self, path: Path, rel: str, start: int, stop: int | None) -> Iterator[Record]:
        """Lines or paragraphs (runs of non-blank lines) that start in [start, stop); a paragraph begun before
        `start` belongs to the piece before, and one begun before `stop` is read to its end."""

        def record(pos: int, raw: bytes, where: str) -> Record | None:
            if not self._wants_rec(rel, pos):
                return None
            try:
                return Record(pos, raw.decode("utf-8").rstrip("\r\n"), None, where)
            except UnicodeDecodeError:
                return Record(pos, None, "undecodable", where)

        by_line = self.config.sample_by == "line"
        para: list[bytes] = []
        para_at, skipping = (0, ""), start > 0 and not by_line and not _blank_before(path, start)
        for pos, line, where in _lines(path, start, None):
            blank = not line.strip()
            if by_line or blank:
                if para:  # a paragraph ends
                    rec = record(para_at[0], b"".join(para), para_at[1])
                    if rec is not None:
                        yield rec
                    para = []
                skipping = False
            if stop is not None and pos >= stop and not para:
                return
            if blank:
                continue
            if by_line:
                rec = record(pos, line, where)
                if rec is not None:
                    yield rec
            elif not skipping:
                if not para:
                    para_at = (pos, where)
                para.append(line)
        if para:
            rec = record(para_at[0], b"".join(para), para_at[1])
            if rec is not None:
                yield rec

    def _wants_rec(self, rel: str, key: int) -> bool:
        return self.config.holdout_fraction <= 0 or self._wants(f"{rel}:{key}")

    def _iter_parquet(self, path: Path, rel: str, start: int, stop: int | None) -> Iterator[Record]:
        import pyarrow.parquet as pq

        field = self.config.text_field
        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            if start == 0:
                yield Record(0, None, "missing_field", f"{path} (no column {field!r})")
            return
        offset = 0
        for rg in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if stop is not None and offset >= stop:
                return
            if offset + n <= start:  # seek by skipping whole row groups: they are never read
                offset += n
                continue
            column = pf.read_row_group(rg, columns=[field]).column(0).to_pylist()
            for j in range(max(start - offset, 0), n if stop is None else min(n, stop - offset)):
                i, text = offset + j, column[j]
                if not self._wants_rec(rel, i):
                    continue
                if not isinstance(text, str):
                    yield Record(i, None, "missing_field", f"{path}:row {i}")
                elif not text.strip():
                    yield Record(i, None, "empty", f"{path}:row {i}")
                else:
                    yield Record(i, text, None, f"{path}:row {i}")
            offset += n


def _lines(path: Path, start: int, stop: int | None) -> Iterator[tuple[int, bytes, str]]:
    """(byte offset, line, where) of the lines of a file that start in [start, stop): the seek is a byte offset,
    so a resumed or split read never re-reads what lies before it. `where` is file:line when reading from the
    file's start, else file:byte offset."""
    with open(path, "rb") as f:
        pos = start
        if start > 0:
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())  # the rest of a line begun before `start` is not ours
        lineno = 1 if start == 0 else None
        while stop is None or pos < stop:
            line = f.readline()
            if not line:
                return
            yield pos, line, f"{path}:{lineno}" if lineno else f"{path}:byte {pos}"
            pos += len(line)
            lineno = lineno + 1 if lineno else None


def _blank_before(path: Path, start: int) -> bool:
    """Whether the line before the first line starting at or after byte `start` is blank: then a paragraph
    starting there is not the tail of an earlier one. Reads backwards only until the answer is known."""
    with open(path, "rb") as f:
        f.seek(start - 1)
        end = start - 1 + len(f.readline()) - 1  # the newline that ends the line before
        while end > 0:
            begin = max(0, end - 4096)
            f.seek(begin)
            chunk = f.read(end - begin)
            for byte in reversed(chunk):
                if byte == 0x0A:
                    return True  # reached the line before that: all whitespace in between
                if byte not in b" \t\r\f\v":
                    return False
            end = begin
    return True


# ----------------------------------------------------------------------------- Hub datasets


class HubSource(Source):
    """`datasets.load_dataset(path, name, split=..., streaming=True)`; one shard per data file."""

    def __init__(self, config: SourceConfig, split: str, num_readers: int = 1):
        self.config, self.split = config, split
        hf_split = config.split if split == "train" else config.validation_split
        if hf_split is None:
            raise DataError(
                f"source {config.describe()} has no validation split; set validation_split to one of the "
                "dataset's splits (e.g. 'validation')"
            )
        self.dataset = _load_streaming(config, hf_split)
        if self.dataset.num_shards < num_readers:
            # one shard per Parquet row group, so that no two readers read the same data file (other formats
            # stay one shard per file). Only then: it opens every file's footer, one request each.
            self.dataset = self.dataset.reshard()
        self.num_shards = self.dataset.num_shards
        self._check_text_field()

    def _check_text_field(self) -> None:
        field = self.config.text_field
        features = self.dataset.features
        names = list(features) if features is not None else None
        if names is None:  # schema unknown until read: peek at the first record
            first = next(iter(self.dataset), None)
            names = list(first) if isinstance(first, dict) else []
        if field not in names:
            raise DataError(_missing_field(self.config, f"text field {field!r} not found", f"fields: {names}"))

    def iter_records(self, shard: int, start: int, stop: int | None = None) -> Iterator[Record]:
        field = self.config.text_field
        ds = self.dataset.shard(num_shards=self.num_shards, index=shard, contiguous=True)
        if start:
            # `skip` reads the rows before `start` again: datasets' own state_dict resumes at a table boundary
            # without saying which, so it cannot place a row exactly. A resharded shard is one row group, so
            # this re-reads less than one row group.
            ds = ds.skip(start)
        # `ds.iter(batch_size)`, not `iter(ds)`: inside a torch DataLoader worker, `IterableDataset.__iter__`
        # splits the shards over the workers once more by itself, but the loader has already dealt them.
        i = start
        for batch in ds.iter(batch_size=256):
            column = batch.get(field)
            for j in range(len(next(iter(batch.values())))):
                text = column[j] if column is not None else None
                where = f"{self.config.describe()} shard {shard} row {i}"
                if not isinstance(text, str):
                    yield Record(i, None, "missing_field", where)
                elif not text.strip():
                    yield Record(i, None, "empty", where)
                else:
                    yield Record(i, text, None, where)
                i += 1


def _load_streaming(config: SourceConfig, hf_split: str) -> Any:
    import datasets

    what = f"dataset {config.path!r}" + (f" (config {config.name!r})" if config.name else "") + f", split {hf_split!r}"
    try:
        return datasets.load_dataset(config.path, config.name, split=hf_split, streaming=True)
    except (ConnectionError, FileNotFoundError) as err:
        offline = (
            " HF_HUB_OFFLINE is set, so only local folders and cached datasets can be opened."
            if os.environ.get("HF_HUB_OFFLINE")
            else ""
        )
        raise DataError(
            f"cannot open {what}: {err}.{offline} Check the dataset id (owner/name) or the local folder path."
        ) from err
    except ValueError as err:  # bad split or config name: datasets lists the available ones
        raise DataError(f"cannot open {what}: {err}") from err


def iter_texts(sources: list[Source], seed: int = 0) -> Iterator[str]:
    """Good documents of several sources, one pass, interleaved one document at a time.

    Shard order is shuffled (seeded) so that a budget smaller than the corpus still samples all of it
    (used for tokenizer training, where the packed loader's sharding and state are not needed).
    """
    import numpy as np

    def one(source: Source, k: int) -> Iterator[str]:
        order = np.random.default_rng([seed, k]).permutation(source.num_shards)
        for shard in order:
            for rec in source.iter_records(int(shard), 0):
                if rec.problem is None:
                    yield rec.text

    iters = [one(s, k) for k, s in enumerate(sources)]
    while iters:
        for it in list(iters):
            text = next(it, None)
            if text is None:
                iters.remove(it)
            else:
                yield text
