"""Packing lanes (data.packing_lanes): the rows of a batch come from different documents, every token is still
packed once, resume is exact with documents pending in several lanes, and states saved before lanes load."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from test_data_helpers import assert_same_batches, lane_documents, make_docs, take, tiny_tokenizer, write_jsonl

from seedlm.data_pipeline import DataConfig, DataError, SourceConfig, build_dataloader
from seedlm.data_pipeline.loader import _find_key


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def long_docs_config(tmp_path, **fields) -> tuple[DataConfig, list[str]]:
    """Documents of 40-60 words, several rows of 16 tokens each: one lane would fill a batch from one of them."""
    docs = make_docs("doc", 30, min_words=40, max_words=60)
    write_jsonl(tmp_path / "long.jsonl", docs)
    fields = {"seq_len": 16, "micro_batch_size": 4, "num_workers": 0, "shuffle_buffer": 8, **fields}
    return DataConfig(sources=[SourceConfig(kind="jsonl", path=str(tmp_path / "long.jsonl"))], **fields), docs


def row_documents(batch, tok) -> list[str]:
    """The document id each row of a batch starts in (rows start with bos at the start of the stream)."""
    return [tok.decode(row, skip_special_tokens=True).split(":")[0] for row in batch["input_ids"].tolist()]


def save_load(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_rows_of_a_batch_come_from_different_documents(tmp_path, tok):
    cfg, docs = long_docs_config(tmp_path, packing_lanes=8)
    first, second = take(build_dataloader(cfg, tok), 2)
    for batch in (first, second):
        assert (batch["input_ids"][:, 0] == tok.bos_token_id).all()  # each lane starts its own document
    assert len(set(row_documents(first, tok) + row_documents(second, tok))) == 8
    one_lane = next(iter(build_dataloader(dataclasses.replace(cfg, packing_lanes=1), tok)))
    assert (one_lane["input_ids"][1:, 0] != tok.bos_token_id).all()  # one document fills the rows in turn


@pytest.mark.parametrize("lanes", [1, 3, 4])
def test_every_document_once_per_pass_with_lanes(tmp_path, tok, lanes):
    cfg, docs = long_docs_config(tmp_path, packing_lanes=lanes, num_epochs=1)
    batches = list(build_dataloader(cfg, tok))
    complete, cut = lane_documents(batches, tok, lanes)
    assert sorted(complete) == sorted(docs) and not cut
    pads = sum(int((b["input_ids"] == tok.pad_token_id).sum()) for b in batches)
    assert pads < lanes * cfg.seq_len  # padding only in each lane's last row


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_with_documents_pending_in_several_lanes(tmp_path, tok, num_workers):
    cfg, _ = long_docs_config(tmp_path, packing_lanes=3, micro_batch_size=2, num_workers=num_workers)
    full = take(build_dataloader(cfg, tok), 24)
    loader = build_dataloader(cfg, tok)
    head = take(loader, 5)
    state = save_load(loader.state_dict())
    lanes = [ds["packer"]["lanes"] for ds in _find_key(state, "dataset_state") if ds]
    assert max(sum(lane is not None for lane in reader) for reader in lanes) >= 2
    resumed = build_dataloader(cfg, tok)
    resumed.load_state_dict(state)
    assert_same_batches(head + take(resumed, 19), full)


def test_resume_reads_a_block_shared_by_several_lanes_once(tmp_path, tok, monkeypatch):
    from seedlm.data_pipeline import loader as loader_module

    cfg, _ = long_docs_config(tmp_path, packing_lanes=4, shuffle_buffer=64)  # all 30 documents in one block
    loader = build_dataloader(cfg, tok)
    take(loader, 3)
    state = save_load(loader.state_dict())
    calls = []
    make_tokenize = loader_module.make_tokenize
    monkeypatch.setattr(loader_module, "make_tokenize", lambda t: lambda texts: calls.append(len(texts)) or
                        make_tokenize(t)(texts))
    resumed = build_dataloader(cfg, tok)
    resumed.load_state_dict(state)
    take(resumed, 1)
    assert calls == [30]  # four pending documents and the position after them: one block, tokenised once


def test_a_state_saved_before_lanes_resumes_with_one_lane(tmp_path, tok):
    cfg, _ = long_docs_config(tmp_path, packing_lanes=1)
    full = take(build_dataloader(cfg, tok), 12)
    loader = build_dataloader(cfg, tok)
    head = take(loader, 4)
    state = save_load(loader.state_dict())
    assert "packing_lanes" not in state["meta"]  # one lane: the meta of a state saved before lanes
    for ds in _find_key(state, "dataset_state"):
        ds["packer"] = ds["packer"]["lanes"][0]  # the single Packer's state of that layout
    resumed = build_dataloader(cfg, tok)
    resumed.load_state_dict(state)
    assert_same_batches(head + take(resumed, 8), full)
    with pytest.raises(DataError, match=r"packing_lanes: saved None, now 64.*set data.packing_lanes=1"):
        build_dataloader(dataclasses.replace(cfg, packing_lanes=None), tok).load_state_dict(state)


def test_a_changed_file_under_a_pending_document_is_refused(tmp_path, tok):
    cfg, docs = long_docs_config(tmp_path, packing_lanes=2, micro_batch_size=2, shuffle=False)
    loader = build_dataloader(cfg, tok)
    take(loader, 3)
    state = save_load(loader.state_dict())
    write_jsonl(tmp_path / "long.jsonl", [d.split(":")[0] + ": short" for d in docs])  # same keys, shorter texts
    resumed = build_dataloader(cfg, tok)
    resumed.load_state_dict(state)
    with pytest.raises(DataError, match="no longer matches the saved state"):
        take(resumed, 1)


def test_packing_lanes_must_be_positive():
    with pytest.raises(DataError, match="packing_lanes must be >= 1, got 0"):
        DataConfig(packing_lanes=0)
    assert DataConfig(micro_batch_size=6).lanes() == 64 and DataConfig(micro_batch_size=6, packing_lanes=2).lanes() == 2
    assert DataConfig(micro_batch_size=128).lanes() == 128  # at least a lane per row
