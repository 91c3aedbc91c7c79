"""Sources: local kinds, the Hub code path on a local dataset folder, bad input, and clear errors."""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_helpers import make_docs, reader_documents, tiny_tokenizer, write_jsonl

from seedlm.data_pipeline import DataConfig, DataError, SourceConfig, build_dataloader, open_source


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def texts(source):
    return [r.text for shard in range(source.num_shards) for r in source.iter_records(shard, 0) if r.problem is None]


def one_pass(cfg, tok):
    loader = build_dataloader(cfg, tok)
    docs = reader_documents(list(loader), tok, cfg.lanes())
    return docs, loader.bad_record_counts()


@pytest.fixture
def bad_corpus(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    lines = [
        json.dumps({"text": "good one"}),
        "{not json",
        json.dumps({"other": "no text field"}),
        json.dumps({"text": ""}),
        "",  # a blank line is not a record
        json.dumps({"text": 7}),
        json.dumps({"text": "good two"}),
    ]
    (d / "a.jsonl").write_text("\n".join(lines) + "\n")
    (d / "b.jsonl").write_bytes(b"\x00\x01\x02 binary \xff\xfe")
    (d / "c.jsonl").write_text("")
    (d / "d.jsonl").write_bytes(json.dumps({"text": "good three"}).encode() + b"\n" + b'{"text": "\xff\xfe"}\n')
    return d


def test_bad_records_are_skipped_and_counted(bad_corpus, tok):
    cfg = DataConfig(
        sources=[SourceConfig(kind="jsonl", path=str(bad_corpus))], seq_len=16, num_workers=0, num_epochs=1
    )
    docs, bad = one_pass(cfg, tok)
    assert sorted(docs) == ["good one", "good three", "good two"]
    assert bad == {"malformed_json": 1, "missing_field": 2, "empty": 1, "binary": 1, "undecodable": 1}


def test_bad_records_counted_once_across_resume(bad_corpus, tok):
    cfg = DataConfig(
        sources=[SourceConfig(kind="jsonl", path=str(bad_corpus))], seq_len=4, micro_batch_size=1, num_workers=0
    )
    loader = build_dataloader(cfg, tok)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    resumed = build_dataloader(cfg, tok)
    resumed.load_state_dict(state)
    assert resumed.bad_record_counts() == loader.bad_record_counts()
    first_epoch = {"malformed_json": 1, "missing_field": 2, "empty": 1, "binary": 1, "undecodable": 1}
    counts = [resumed.bad_record_counts() for _, _ in zip(range(12), resumed)]
    assert first_epoch in counts  # after the first epoch, each bad record counted once (then again per epoch)


def test_strict_mode_raises(bad_corpus, tok):
    cfg = DataConfig(sources=[SourceConfig(kind="jsonl", path=str(bad_corpus))], num_workers=0, strict=True)
    with pytest.raises(DataError, match=r"malformed_json.*a\.jsonl:2.*strict"):
        next(iter(build_dataloader(cfg, tok)))


def test_files_folder_skips_empty_and_binary(tmp_path, tok):
    (tmp_path / "docs" / "deep").mkdir(parents=True)
    (tmp_path / "docs" / "one.md").write_text("first file\nwith two lines")
    (tmp_path / "docs" / "deep" / "two.md").write_text("second file")
    (tmp_path / "docs" / "empty.md").write_text("   \n")
    (tmp_path / "docs" / "blob.md").write_bytes(bytes(range(256)))
    (tmp_path / "docs" / "ignored.txt").write_text("not matched by the glob")
    src = SourceConfig(kind="files", path=str(tmp_path / "docs"), glob="**/*.md")
    docs, bad = one_pass(DataConfig(sources=[src], seq_len=8, num_workers=0, num_epochs=1), tok)
    assert sorted(docs) == ["first file\nwith two lines", "second file"]
    assert bad["empty"] == 1 and bad["binary"] == 1


def test_text_and_parquet_kinds(tmp_path):
    (tmp_path / "t.txt").write_text("para one\nline two\n\n\npara two\n\nlast")
    by = {s: texts(open_source(SourceConfig(kind="text", path=str(tmp_path / "t.txt"), sample_by=s))) for s in
          ("line", "paragraph", "document")}  # fmt: skip
    assert by["line"] == ["para one", "line two", "para two", "last"]
    assert by["paragraph"] == ["para one\nline two", "para two", "last"]
    assert by["document"] == ["para one\nline two\n\n\npara two\n\nlast"]

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"content": ["a", None, "b", "c"]}), tmp_path / "pq" / "0.parquet", row_group_size=2)
    src = open_source(SourceConfig(kind="parquet", path=str(tmp_path / "pq"), text_field="content"))
    assert texts(src) == ["a", "b", "c"]
    assert [r.text for r in src.iter_records(0, 3)] == ["c"]  # seeking skips whole row groups
    with pytest.raises(DataError, match=r"column 'text' not in .*columns: \['content'\]\. Set the source's text_field"):
        open_source(SourceConfig(kind="parquet", path=str(tmp_path / "pq")))


def test_seek_by_byte_offset(tmp_path):
    """jsonl keys are byte offsets: a read from any offset starts at the next line, and stops before `stop`."""
    path = write_jsonl(tmp_path / "a.jsonl", make_docs("doc", 10))
    starts = [0]
    for line in path.read_bytes().splitlines(keepends=True)[:-1]:
        starts.append(starts[-1] + len(line))
    src = open_source(SourceConfig(kind="jsonl", path=str(path)))
    assert [r.raw_idx for r in src.iter_records(0, 0)] == starts
    assert [r.raw_idx for r in src.iter_records(0, starts[7])] == starts[7:]
    assert [r.raw_idx for r in src.iter_records(0, starts[6] + 1, starts[9])] == starts[7:9]  # mid-line: the next
    assert [r.text for r in src.iter_records(0, starts[7])] == make_docs("doc", 10)[7:]


def make_hub_folder(root):
    """A script-free dataset folder, as on the Hub: data/{split}-0000i-of-0000n.parquet."""
    (root / "data").mkdir(parents=True)
    docs = make_docs("hub", 12)
    for i in range(3):
        pq.write_table(pa.table({"text": docs[i * 4 : i * 4 + 4]}), root / "data" / f"train-0000{i}-of-00003.parquet")
    pq.write_table(
        pa.table({"text": ["held out A", "held out B"]}), root / "data" / "validation-00000-of-00001.parquet"
    )
    return docs


def test_hub_code_path_on_local_dataset_folder(tmp_path, tok):
    docs = make_hub_folder(tmp_path / "ds")
    src = open_source(SourceConfig(kind="hub", path=str(tmp_path / "ds"), split="train"))
    assert src.num_shards == 3
    assert texts(src) == docs
    assert [r.text for r in src.iter_records(1, 2)] == docs[6:8]
    cfg = DataConfig(
        sources=[SourceConfig(kind="hub", path=str(tmp_path / "ds"), validation_split="validation")],
        seq_len=16, micro_batch_size=2, num_workers=2, num_epochs=1,
    )  # fmt: skip
    got = []
    for rank in range(2):
        got += [b for b in build_dataloader(cfg, tok, rank, 2)]
    n_bos = sum(int((b["input_ids"] == tok.bos_token_id).sum()) for b in got)
    assert n_bos == len(docs)  # 3 shards < 4 readers: round-robin, each document once
    val_loader = build_dataloader(dataclasses.replace(cfg, num_workers=0), tok, split="validation")
    val = reader_documents(list(val_loader), tok, cfg.lanes())
    assert val == ["held out A", "held out B"]


def test_clear_errors_before_training(tmp_path, tok):
    make_hub_folder(tmp_path / "ds")
    with pytest.raises(DataError, match="no files match"):
        open_source(SourceConfig(kind="jsonl", path=str(tmp_path / "*.jsonl")))
    with pytest.raises(DataError, match="does not exist"):
        open_source(SourceConfig(kind="jsonl", path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(DataError, match="cannot open dataset 'nosuch-org/nosuch-dataset'.*HF_HUB_OFFLINE"):
        open_source(SourceConfig(kind="hub", path="nosuch-org/nosuch-dataset"))
    with pytest.raises(DataError, match="split 'nosuch'.*Bad split"):
        open_source(SourceConfig(kind="hub", path=str(tmp_path / "ds"), split="nosuch"))
    with pytest.raises(DataError, match="config 'nosuch'"):
        open_source(SourceConfig(kind="hub", path=str(tmp_path / "ds"), name="nosuch"))
    with pytest.raises(DataError, match="text field 'body' not found"):
        open_source(SourceConfig(kind="hub", path=str(tmp_path / "ds"), text_field="body"))
    write_jsonl(tmp_path / "j.jsonl", ["x", "y"], field="content")
    with pytest.raises(DataError, match=r"text field 'text' not found.*keys seen: \['content', 'id'\]"):
        open_source(SourceConfig(kind="jsonl", path=str(tmp_path / "j.jsonl")))
    with pytest.raises(DataError, match="unknown data key"):
        DataConfig.from_dict({"seq_len": 8, "seqlen": 9})
    with pytest.raises(DataError, match="unknown source kind"):
        SourceConfig.from_dict({"kind": "csv", "path": "x"})


def test_more_readers_than_documents(tmp_path, tok):
    write_jsonl(tmp_path / "two.jsonl", ["first doc", "second doc"])
    src = [SourceConfig(kind="jsonl", path=str(tmp_path / "two.jsonl"))]
    # a finite pass (validation, num_epochs) just ends for the readers that got nothing
    cfg = DataConfig(sources=src, seq_len=64, micro_batch_size=1, num_workers=2, num_epochs=1)
    docs = [d for rank in range(2) for d in reader_documents(list(build_dataloader(cfg, tok, rank, 2)), tok)]
    assert sorted(docs) == ["first doc", "second doc"]
    # repeating forever would loop on an empty epoch: one clear message instead
    cfg = DataConfig(sources=src, seq_len=8, micro_batch_size=1, num_workers=0)
    with pytest.raises(DataError, match="reader 3 of 4 got no documents.*use fewer ranks/workers or more data"):
        next(iter(build_dataloader(cfg, tok, rank=3, world_size=4)))


def test_one_source_syntax_in_config_and_command_line(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ["x", "y"])
    (tmp_path / "docs").mkdir()
    string, mapping, bare, folder, stdlib = DataConfig.from_dict({"sources": [
        f"jsonl:{data}", {"kind": "jsonl", "path": str(data), "weight": 2.0}, str(data), str(tmp_path / "docs"),
        "stdlib",
    ]}).sources
    assert (string.kind, string.path) == (mapping.kind, mapping.path) == (bare.kind, bare.path) == ("jsonl", str(data))
    assert mapping.weight == 2.0 and folder.kind == "files" and stdlib.kind == "stdlib"
    assert string == SourceConfig.from_spec(f"jsonl:{data}")  # the same parser as `--source`
    assert [s.kind for s in DataConfig.from_dict({"sources": "hub:owner/name"}).sources] == ["hub"]  # no list
    # the forms mixed up get the fix in the message
    with pytest.raises(DataError, match=r"write jsonl:/d.jsonl \(no space after the colon\)"):
        DataConfig.from_dict({"sources": [{"jsonl": "/d.jsonl"}]})
    with pytest.raises(DataError, match=r"the mapping form is \{kind: jsonl, path: /d.jsonl\}"):
        DataConfig.from_dict({"sources": [{"kind": "jsonl:/d.jsonl"}]})
    with pytest.raises(DataError, match="cannot tell the kind of source 'csv:x'"):
        DataConfig.from_dict({"sources": ["csv:x"]})
    with pytest.raises(DataError, match="neither a string"):
        DataConfig.from_dict({"sources": [3]})
