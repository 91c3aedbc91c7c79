"""Streaming sources shared by more readers than they have shards: split by row group or byte range, read once;
resumed by seeking; moved to another world size with no document repeated or skipped."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_helpers import lane_documents, make_docs, take, tiny_tokenizer, write_jsonl

from seedlm.data_pipeline import DataConfig, DataError, SourceConfig, build_dataloader, open_source
from seedlm.data_pipeline.loader import can_change_topology
from seedlm.data_pipeline.readers import reader_pieces


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def read_pieces(source, num_readers):
    """Every reader's records (key, text), reading only its own pieces."""
    out = []
    for reader in range(num_readers):
        mine = []
        for shard, start, stop in reader_pieces(source, reader, num_readers):
            mine += [(shard, r.raw_idx, r.text) for r in source.iter_records(shard, start, stop)]
        out.append(mine)
    return out


def whole(source):
    return [(s, r.raw_idx, r.text) for s in range(source.num_shards) for r in source.iter_records(s, 0)]


@pytest.mark.parametrize("num_readers", [2, 3, 4, 7])
def test_fewer_shards_than_readers_every_record_read_by_one_reader(tmp_path, num_readers):
    docs = make_docs("doc", 23)
    text = "".join(f"{d}\n" if i % 3 else f"{d}\nsecond line of {i}\n\n\n" for i, d in enumerate(docs))
    (tmp_path / "t.txt").write_text(text)
    write_jsonl(tmp_path / "a.jsonl", docs)
    pq.write_table(pa.table({"text": docs}), tmp_path / "p.parquet", row_group_size=3)
    sources = [SourceConfig(kind="jsonl", path=str(tmp_path / "a.jsonl")),
               SourceConfig(kind="parquet", path=str(tmp_path / "p.parquet"))]
    sources += [SourceConfig(kind="text", path=str(tmp_path / "t.txt"), sample_by=by) for by in ("line", "paragraph")]
    for cfg in sources:
        src = open_source(cfg)
        per_reader = read_pieces(src, num_readers)
        got = sorted(r for mine in per_reader for r in mine)
        assert got == sorted(whole(src)), cfg.describe()  # all records, none twice
        assert all(per_reader), cfg.describe()  # every reader has a share


def test_parquet_row_groups_dealt_to_readers(tmp_path):
    """One file of 8 row groups, 4 readers: each reads 2 whole row groups, never another reader's."""
    pq.write_table(pa.table({"text": make_docs("doc", 64)}), tmp_path / "p.parquet", row_group_size=8)
    src = open_source(SourceConfig(kind="parquet", path=str(tmp_path / "p.parquet")))
    pieces = [reader_pieces(src, r, 4) for r in range(4)]
    assert pieces == [[(0, 16 * r, 16 * r + 16)] for r in range(3)] + [[(0, 48, None)]]


def test_resume_seeks_past_what_was_read(tmp_path, tok):
    """The resumed loader reads from the saved byte offset: bytes before it can change without effect."""
    path = write_jsonl(tmp_path / "a.jsonl", make_docs("doc", 200))
    cfg = DataConfig(sources=[SourceConfig(kind="jsonl", path=str(path))], seq_len=32, micro_batch_size=2,
                     num_workers=0, shuffle_buffer=8, num_epochs=1)
    loader = build_dataloader(cfg, tok)
    take(loader, 40)
    state = loader.state_dict()
    dataset_state = state["loader"]["dataset_state"]
    # the earliest block the resume reads: the current one, or a block holding a lane's pending document
    key = min([dataset_state["stream"]["sources"][0]["key"]] +
              [lane["stream_before"]["sources"][0]["key"] for lane in dataset_state["packer"]["lanes"] if lane])
    assert key > 1000  # a byte offset well into the file
    expected = list(_resumed(cfg, tok, state))
    raw = path.read_bytes()
    path.write_bytes(b"x" * (key - 1) + raw[key - 1 :])  # what lies before the block is garbage now
    assert _same(list(_resumed(cfg, tok, state)), expected)


def _resumed(cfg, tok, state):
    loader = build_dataloader(cfg, tok)
    loader.load_state_dict(state)
    return iter(loader)


def _same(a, b):
    return len(a) == len(b) and all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(a, b))


def topology_config(tmp_path):
    write_jsonl(tmp_path / "one.jsonl", make_docs("alpha", 70))  # one shard: split by byte range
    (tmp_path / "t.txt").write_text("".join(f"{d}\n\n" for d in make_docs("beta", 50)))  # paragraphs
    sources = [SourceConfig(kind="jsonl", path=str(tmp_path / "one.jsonl"), weight=2.0),
               SourceConfig(kind="text", path=str(tmp_path / "t.txt"))]
    return DataConfig(sources=sources, seq_len=24, micro_batch_size=2, num_workers=0, shuffle_buffer=4,
                      num_epochs=1, seed=5), make_docs("alpha", 70) + make_docs("beta", 50)


@pytest.mark.parametrize("before,after,steps", [(2, 3, 9), (3, 1, 5), (2, 4, 30)])
def test_resume_on_another_world_size_reads_each_document_once(tmp_path, tok, before, after, steps):
    cfg, docs = topology_config(tmp_path)
    states, seen, cut = [], [], []
    for rank in range(before):
        loader = build_dataloader(cfg, tok, rank, before)
        complete, tails = lane_documents(take(loader, steps), tok, cfg.lanes())
        seen += complete
        cut += tails
        states.append(loader.state_dict())
    assert all(can_change_topology(s) for s in states)
    for rank in range(after):
        loader = build_dataloader(cfg, tok, rank, after)
        loader.load_state_dicts(states)
        complete, tails = lane_documents(list(loader), tok, cfg.lanes())
        assert not tails
        seen += complete
    assert len(seen) == len(set(seen))  # no document twice
    missing = sorted(set(docs) - set(seen))
    assert set(seen) <= set(docs)
    # only the documents the save cut mid-way are not seen whole again (their rest is dropped, not repeated)
    assert len(missing) == len(cut) and all(any(m.startswith(t) for m in missing) for t in cut)


def test_topology_change_refused_when_settings_differ(tmp_path, tok):
    cfg, _ = topology_config(tmp_path)
    states = []
    for rank in range(2):
        loader = build_dataloader(cfg, tok, rank, 2)
        take(loader, 2)
        states.append(loader.state_dict())
    cfg.seq_len = 32
    with pytest.raises(DataError, match="seq_len: saved 24, now 32"):
        build_dataloader(cfg, tok, 0, 3).load_state_dicts(states)
    cfg.seq_len = 24
    with pytest.raises(DataError, match="1 data states were given.*world_size=2: pass every rank's state"):
        build_dataloader(cfg, tok, 0, 3).load_state_dicts(states[:1])
    assert not can_change_topology({"format": "seedlm.data_pipeline.v1"})
