"""Sharding, packing through the loader, mixing, and exact resume (offline, tiny files in tmp_path)."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from test_data_helpers import (
    assert_same_batches,
    make_docs,
    reader_documents,
    segments,
    take,
    tiny_tokenizer,
    write_files,
    write_jsonl,
)

from seedlm.data_pipeline import DataConfig, DataError, SourceConfig, build_dataloader, is_heldout


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def all_batches(cfg, tok, world_size, split="train"):
    return [b for rank in range(world_size) for b in build_dataloader(cfg, tok, rank, world_size, split=split)]


def check_exactly_once(batches, docs, tok):
    """Every document appears exactly once, whole, and no segment mixes documents."""
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    expected = Counter()
    for d in docs:
        expected.update([bos, *tok(d, add_special_tokens=False)["input_ids"], eos])
    got = Counter(t for b in batches for t in b["input_ids"].reshape(-1).tolist() if t != pad)
    assert got == expected  # the exact multiset of tokens: nothing lost, nothing repeated

    by_id = {d.split(":")[0]: d for d in docs}
    started = Counter()
    for b in batches:
        for seg in segments(b):
            seg = [t for t in seg if t != pad]
            if not seg:
                continue
            # bos only at a segment start, eos only at a segment end: no segment spans two documents
            assert bos not in seg[1:] and eos not in seg[:-1]
            text = tok.decode(seg, skip_special_tokens=True)
            if seg[0] == bos:
                if ":" in text:  # else the row ended inside the id: counted, not identified
                    doc_id = text.split(":")[0]
                    assert by_id[doc_id].startswith(text)
                    started[doc_id] += 1
                started["any"] += 1
            else:
                assert any(text in d for d in docs)
    assert started["any"] == len(docs)
    assert max(v for k, v in started.items() if k != "any") == 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_document_once_per_epoch_shards(tmp_path, tok, num_workers):
    """A folder of 40 files (more shards than 2 ranks x 2 workers): shards dealt to readers."""
    docs = make_docs("doc", 40)
    cfg = DataConfig(
        sources=[SourceConfig(kind="files", path=str(write_files(tmp_path / "f", docs)))],
        seq_len=32, micro_batch_size=3, num_workers=num_workers, shuffle_buffer=5, num_epochs=1,
    )  # fmt: skip
    check_exactly_once(all_batches(cfg, tok, world_size=2), docs, tok)


def test_every_document_once_per_epoch_round_robin(tmp_path, tok):
    """Two jsonl files (fewer shards than 4 readers): documents dealt round-robin."""
    docs = make_docs("doc", 57)
    write_jsonl(tmp_path / "d" / "a.jsonl", docs[:30])
    write_jsonl(tmp_path / "d" / "b.jsonl", docs[30:])
    cfg = DataConfig(
        sources=[SourceConfig(kind="jsonl", path=str(tmp_path / "d"))],
        seq_len=24, micro_batch_size=2, num_workers=2, shuffle_buffer=4, num_epochs=1,
    )  # fmt: skip
    check_exactly_once(all_batches(cfg, tok, world_size=2), docs, tok)


def test_packed_rows_positions_and_labels(tmp_path, tok):
    docs = make_docs("doc", 30)
    cfg = DataConfig(
        sources=[SourceConfig(kind="jsonl", path=str(write_jsonl(tmp_path / "a.jsonl", docs)))],
        seq_len=16, micro_batch_size=4, num_workers=0, num_epochs=1,
    )  # fmt: skip
    batches = list(build_dataloader(cfg, tok))
    for b in batches:
        ids, pos, labels = b["input_ids"], b["position_ids"], b["labels"]
        assert ids.dtype == pos.dtype == labels.dtype == torch.int64 and ids.shape[1] == 16
        assert (pos[:, 0] == 0).all()
        # positions count up by one inside a segment and restart at 0 only at a segment start
        step = pos[:, 1:] - pos[:, :-1]
        assert ((step == 1) | (pos[:, 1:] == 0)).all()
        # a new document (bos) always starts a segment; a segment start is never predicted
        assert (pos[ids == tok.bos_token_id] == 0).all()
        assert (labels[pos == 0] == -100).all()
        real = (pos != 0) & (ids != tok.pad_token_id)
        assert torch.equal(labels[real], ids[real])
        assert set(b) == {"input_ids", "labels", "position_ids"}  # document boundaries live in position_ids
    # the stream's last row is padded, and padding is never a label
    last = batches[-1]
    assert (last["input_ids"] == tok.pad_token_id).any()
    assert not (last["labels"] == tok.pad_token_id).any()


def mixture_config(tmp_path, num_workers=2, **kw):
    write_files(tmp_path / "files", make_docs("alpha", 60))
    write_jsonl(tmp_path / "one.jsonl", make_docs("beta", 30))
    sources = [
        SourceConfig(kind="files", path=str(tmp_path / "files"), weight=2.0),
        SourceConfig(kind="jsonl", path=str(tmp_path / "one.jsonl"), weight=1.0),  # 1 shard < 4 readers
    ]
    return DataConfig(
        sources=sources, seq_len=32, micro_batch_size=2, num_workers=num_workers, shuffle_buffer=4, seed=3, **kw
    )


def save_load(state):
    """Through torch.save / torch.load(weights_only=True), as a checkpoint would carry it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def source_epochs(state):
    """Epoch of every (worker, source) position in a loader state."""
    from seedlm.data_pipeline.loader import _find_key

    return [s["epoch"] for ds in _find_key(state, "dataset_state") if ds for s in ds["stream"]["sources"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_mid_epoch_and_across_epochs(tmp_path, tok, num_workers):
    cfg = mixture_config(tmp_path, num_workers=num_workers)
    N = 40
    full = take(build_dataloader(cfg, tok, rank=1, world_size=2), N)
    assert len(full) == N
    for k in (3, 17):
        loader = build_dataloader(cfg, tok, rank=1, world_size=2)
        head = take(loader, k)
        state = save_load(loader.state_dict())
        if k == 3:
            assert max(source_epochs(state)) == 0  # resumes mid-epoch, then crosses epoch boundaries
        else:
            assert max(source_epochs(state)) >= 1  # resumes after an epoch boundary
        resumed = build_dataloader(cfg, tok, rank=1, world_size=2)
        resumed.load_state_dict(state)
        tail = take(resumed, N - k)
        assert_same_batches(head + tail, full)
    assert max(source_epochs(save_load(resumed.state_dict()))) >= 2  # several epochs in the resumed part


def test_deterministic_and_seeded(tmp_path, tok):
    cfg = mixture_config(tmp_path, num_workers=0)
    a = take(build_dataloader(cfg, tok), 10)
    assert_same_batches(a, take(build_dataloader(cfg, tok), 10))
    cfg.seed = 4
    b = take(build_dataloader(cfg, tok), 10)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


def test_resume_with_other_world_size_or_settings_is_refused(tmp_path, tok):
    cfg = mixture_config(tmp_path, num_workers=0)
    loader = build_dataloader(cfg, tok, rank=0, world_size=2)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(DataError, match="world_size=2 x num_workers=0.*world_size=1"):
        build_dataloader(cfg, tok, rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(DataError, match="rank 0 was loaded on rank 1"):
        build_dataloader(cfg, tok, rank=1, world_size=2).load_state_dict(state)
    cfg.seq_len = 64
    with pytest.raises(DataError, match="seq_len: saved 32, now 64"):
        build_dataloader(cfg, tok, rank=0, world_size=2).load_state_dict(state)


def test_mixture_proportions(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", make_docs("alpha", 40, max_words=4))
    write_jsonl(tmp_path / "b.jsonl", make_docs("beta", 40, max_words=4))
    cfg = DataConfig(
        sources=[
            SourceConfig(kind="jsonl", path=str(tmp_path / "a.jsonl"), weight=3.0),
            SourceConfig(kind="jsonl", path=str(tmp_path / "b.jsonl"), weight=1.0),
        ],
        seq_len=64, micro_batch_size=8, num_workers=0, shuffle_buffer=8,
    )  # fmt: skip
    counts = Counter(d[:4] for d in reader_documents(take(build_dataloader(cfg, tok), 60), tok, cfg.lanes()))
    n = counts["alph"] + counts["beta"]
    assert n == sum(counts.values()) and n > 1500
    assert abs(counts["alph"] / n - 0.75) < 0.04  # binomial std at n=1500 is 0.011


def test_validation_split_is_disjoint_and_complete(tmp_path, tok):
    docs = make_docs("doc", 60)
    folder = write_files(tmp_path / "f", docs)
    src = SourceConfig(kind="files", path=str(folder), holdout_fraction=0.2)
    held = {f"doc{i:04d}" for i in range(60) if is_heldout(f"sub{i % 3}/doc{i:04d}.txt", 0.2)}
    assert 0 < len(held) < 60
    cfg = DataConfig(sources=[src], seq_len=32, micro_batch_size=2, num_workers=0, num_epochs=1)

    def doc_ids(batches):
        return Counter(d.split(":")[0] for d in reader_documents(batches, tok, cfg.lanes()))

    val = doc_ids(all_batches(cfg, tok, 1, split="validation"))
    train = doc_ids(all_batches(cfg, tok, 1, split="train"))
    assert set(val) == held and set(train) == {f"doc{i:04d}" for i in range(60)} - held
    assert max(val.values()) == max(train.values()) == 1
    with pytest.raises(DataError, match="no held-out split"):
        build_dataloader(DataConfig(sources=[SourceConfig(kind="files", path=str(folder))]), tok, split="validation")


def test_stdlib_default_source():
    from seedlm.data_pipeline import open_source

    train, val = open_source(SourceConfig(), "train"), open_source(SourceConfig(), "validation")
    assert not any("site-packages" in f for f in train.files)
    assert all(f.endswith(".py") for f in train.files[:50])
    assert set(train.files).isdisjoint(val.files)
    assert 0.005 < len(val.files) / (len(train.files) + len(val.files)) < 0.05


def test_prepare_local_reads_local_sources_through_a_cache(tmp_path, tok, monkeypatch):
    """data.prepare_local: the files are prepared once into a cache keyed by sources and tokenizer, then read in
    the prepared, topology-free order; a changed file is a new cache entry."""
    from seedlm.data_pipeline import PreparedLoader
    from seedlm.data_pipeline.prepared import MANIFEST, local_cache_dir, read_manifest

    monkeypatch.setenv("SEEDLM_DATA_CACHE", str(tmp_path / "cache"))
    docs = make_docs("doc", 40)
    folder = write_files(tmp_path / "f", docs)
    cfg = DataConfig(sources=[SourceConfig(kind="files", path=str(folder))], tokenizer=tok.name_or_path,
                     seq_len=32, micro_batch_size=2, num_workers=0, prepare_local=True)
    loader = build_dataloader(cfg, tok)
    assert isinstance(loader, PreparedLoader)
    cache = local_cache_dir(cfg, tok)
    manifest = (cache / MANIFEST).stat().st_mtime_ns
    assert (cache / MANIFEST).is_file() and cfg.prepared is None  # the run's config is left as it was
    first = take(loader, 3)
    assert_same_batches(take(build_dataloader(cfg, tok), 3), first)  # from the cache, not prepared again
    assert (cache / MANIFEST).stat().st_mtime_ns == manifest
    assert read_manifest(cache)["documents"] == len(docs)
    (folder / "sub0" / "doc0000.txt").write_text("doc0000: changed")
    assert local_cache_dir(cfg, tok) != cache
    with pytest.raises(DataError, match="prepare_local reads prepared rows.*leave num_epochs out"):
        DataConfig(prepare_local=True, num_epochs=1)
