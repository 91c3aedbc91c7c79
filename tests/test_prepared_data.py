"""Prepared token shards (data_pipeline/prepared.py, `seedlm data prepare`): the rows equal the packer's, the
global batches are the same under any world size / accumulation / workers, a resume continues on another
topology, an interrupted prepare continues, and each bad input is refused before compute, with nothing
overwritten."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from seedlm.data_pipeline import DataConfig, DataError, SourceConfig, build_dataloader, load_tokenizer, prepare
from seedlm.data_pipeline.packing import Packer
from seedlm.data_pipeline.prepared import GlobalOrder, PreparedSplit
from seedlm.launch.cli import main as seedlm
from tests.helpers import tiny_run_overrides, write_tiny_corpus_and_tokenizer

SEQ_LEN, SHARD_TOKENS = 64, 4000


def source_config(corpus, **fields) -> DataConfig:
    return DataConfig(sources=[SourceConfig(kind="jsonl", path=str(corpus), holdout_fraction=0.1)], **fields)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny corpus (plus one malformed line and one empty text), its tokenizer, and it prepared once."""
    root = tmp_path_factory.mktemp("prepared")
    corpus, tok = write_tiny_corpus_and_tokenizer(root)
    with open(corpus, "a") as f:
        f.write('{"text": "unterminated\n{"text": "   "}\n')
    out = root / "set"
    manifest = prepare(source_config(corpus), tok, out, num_proc=1, shard_tokens=SHARD_TOKENS, show_progress=False)
    return corpus, tok, out, manifest


def copy_set(out, tmp_path):
    return shutil.copytree(out, tmp_path / "copy")


def loader_config(path, **fields) -> DataConfig:
    return DataConfig(prepared=str(path), seq_len=SEQ_LEN, **fields)


def test_manifest_and_rows_are_the_packers(tiny, tmp_path):
    corpus, tok_dir, out, manifest = tiny
    tok = load_tokenizer(tok_dir)
    train = manifest["splits"]["train"]
    assert manifest["dtype"] == "uint16" and manifest["complete"] and len(train["shards"]) > 2
    assert manifest["tokens"] == sum(s["tokens"] for s in train["shards"]) > 3 * SHARD_TOKENS
    assert manifest["documents"] + manifest["splits"]["validation"]["documents"] == 400
    # the two bad lines are counted in whichever split their position's hash puts them
    bad = {k: manifest["splits"]["train"]["bad_records"][k] + manifest["splits"]["validation"]["bad_records"][k]
           for k in ("malformed_json", "empty")}
    assert bad == {"malformed_json": 1, "empty": 1}
    assert all(s["tokens"] >= SHARD_TOKENS for s in train["shards"][:-1])
    # the documents, in order, are the tokenizer's encodings of the train split's texts
    split = PreparedSplit(out, "train")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:400]]
    first_train = next(t for t in texts if split.doc_len[0] == len(tok(t, add_special_tokens=False)["input_ids"]))
    tokens = np.fromfile(out / train["shards"][0]["bin"], np.uint16)[: split.doc_len[0]]
    assert tokens.tolist() == tok(first_train, add_special_tokens=False)["input_ids"]
    # every row, built on its own, equals the packer's row over all documents in order (documents cut across
    # rows and shards included)
    split.set_framing(SEQ_LEN, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok))
    docs = iter(range(len(split.doc_len)))

    def pull():
        d = next(docs, None)
        return None if d is None else (split._doc_tokens(d, 0, int(split.doc_len[d])), None)

    packer, rows = Packer(SEQ_LEN, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), []
    while (row := packer.next_row(pull)) is not None:
        rows.append(row)
    assert len(rows) == split.num_rows(padded_last=True) == split.num_rows() + 1
    for i, (ids, pos, real) in enumerate(rows):
        got = split.row(i)
        assert np.array_equal(got[0], ids) and np.array_equal(got[1], pos) and got[2] == real, i
    # two processes write the same bytes
    again = prepare(source_config(corpus), tok_dir, tmp_path / "two", num_proc=2, shard_tokens=SHARD_TOKENS,
                    show_progress=False)
    assert again["splits"] == manifest["splits"]
    for shard in train["shards"]:
        assert (tmp_path / "two" / shard["bin"]).read_bytes() == (out / shard["bin"]).read_bytes()


def global_batches(path, tok, world, accum, workers, steps, state=None, seed=0):
    """Global batch (input_ids, position_ids) of each step, assembled from every rank's micro-batches in
    (rank, micro-batch) order; and rank 0's state after the last step."""
    loaders = [build_dataloader(loader_config(path, micro_batch_size=2, num_workers=workers, seed=seed), tok, r,
                                world, grad_accum_steps=accum) for r in range(world)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    its = [iter(loader) for loader in loaders]
    out = []
    for _ in range(steps):
        micro = [next(it) for it in its for _ in range(accum)]  # rank 0's micro-batches, then rank 1's, ...
        out.append(torch.cat([b["input_ids"] for b in micro]))
    states = [loader.state_dict() for loader in loaders]
    assert all(s == states[0] for s in states)  # the same position on every rank
    return out, states[0]


def test_global_batches_do_not_depend_on_the_topology(tiny):
    _, tok_dir, out, _ = tiny
    tok = load_tokenizer(tok_dir)
    reference, _ = global_batches(out, tok, world=1, accum=4, workers=0, steps=3)
    assert all(b.shape == (8, SEQ_LEN) for b in reference)
    assert not torch.equal(reference[0], reference[1])
    for world, accum in ((1, 4), (2, 2), (4, 1)):
        for workers in (0, 2):
            got, state = global_batches(out, tok, world, accum, workers, steps=3)
            assert all(torch.equal(a, b) for a, b in zip(got, reference)), (world, accum, workers)
            assert state["rows_consumed"] == 3 * 8
    other_seed, _ = global_batches(out, tok, world=1, accum=4, workers=0, steps=1, seed=1)
    assert not torch.equal(other_seed[0], reference[0])


def test_resume_continues_on_another_topology(tiny):
    _, tok_dir, out, _ = tiny
    tok = load_tokenizer(tok_dir)
    straight, _ = global_batches(out, tok, world=1, accum=4, workers=0, steps=5)
    first, state = global_batches(out, tok, world=2, accum=2, workers=2, steps=3)
    assert state["rows_consumed"] == 24
    resumed, _ = global_batches(out, tok, world=4, accum=1, workers=2, steps=2, state=state)
    assert all(torch.equal(a, b) for a, b in zip(first + resumed, straight))


def test_order_is_a_permutation_per_epoch_and_mixes_by_weight():
    order = GlobalOrder([10], [1.0], seed=3)
    epoch0, epoch1 = order.rows(0, 10), order.rows(10, 10)
    assert sorted(r for _, r in epoch0) == list(range(10)) == sorted(r for _, r in epoch1) and epoch0 != epoch1
    assert order.rows(5, 3) == epoch0[5:8]  # a jump back gives the same rows
    mixed = GlobalOrder([50, 7], [0.75, 0.25], seed=0)
    picks = mixed.rows(0, 4000)
    share = sum(s == 1 for s, _ in picks) / len(picks)
    assert 0.22 < share < 0.28
    assert mixed.rows(1234, 5) == picks[1234:1239] == GlobalOrder([50, 7], [0.75, 0.25], seed=0).rows(1234, 5)


def test_mixture_of_prepared_sets(tiny, tmp_path):
    _, tok_dir, out, _ = tiny
    tok = load_tokenizer(tok_dir)
    cfg = DataConfig(prepared=[{"path": str(out), "weight": 3}, {"path": str(out), "weight": 1}], seq_len=SEQ_LEN,
                     micro_batch_size=4, num_workers=0)
    batch = next(iter(build_dataloader(cfg, tok, 0, 1)))
    assert batch["input_ids"].shape == (4, SEQ_LEN) and int(batch["input_ids"].max()) < len(tok)
    validation = list(build_dataloader(cfg, tok, split="validation"))
    assert sum(int((b["labels"] != -100).sum()) for b in validation) > 0


def test_validation_rows_come_in_a_fixed_shuffled_order(tiny):
    """The first eval_batches of the held-out split are a sample of all of it (in document order they were the
    first documents only), the same rows whatever the run's seed, and the same rows at any world size."""
    _, tok_dir, out, _ = tiny
    tok = load_tokenizer(tok_dir)
    split = PreparedSplit(out, "validation")
    split.set_framing(SEQ_LEN, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok))
    in_doc_order = [torch.as_tensor(split.row(r)[0]) for r in range(split.num_rows(padded_last=True))]

    def rows(seed, rank=0, world=1):
        cfg = DataConfig(prepared=[{"path": str(out)}], seq_len=SEQ_LEN, micro_batch_size=2, seed=seed)
        return [r for b in build_dataloader(cfg, tok, rank, world, split="validation") for r in b["input_ids"]]

    shuffled = rows(seed=0)
    assert len(in_doc_order) >= 8 and len(shuffled) == len(in_doc_order)
    position = [next(i for i, row in enumerate(in_doc_order) if torch.equal(row, x)) for x in shuffled]
    assert sorted(position) == list(range(len(in_doc_order)))  # every row once
    assert max(position[:4]) >= len(in_doc_order) // 2  # the first two batches reach past the first half
    assert all(torch.equal(a, b) for a, b in zip(rows(seed=7), shuffled))
    two_ranks = [rows(0, rank, 2) for rank in (0, 1)]
    interleaved = [row for pair in zip(*two_ranks) for row in pair]
    assert all(torch.equal(a, b) for a, b in zip(interleaved, shuffled))


def test_interrupted_prepare_continues(tiny, tmp_path):
    corpus, tok_dir, out, manifest = tiny
    part = copy_set(out, tmp_path)
    # what an interruption after the first shard leaves: that shard listed, a half-written next one, no validation
    cut = json.loads((part / "manifest.json").read_text())
    cut["complete"] = False
    cut["splits"]["train"] = {"complete": False, "shards": cut["splits"]["train"]["shards"][:1]}
    cut["splits"]["validation"] = {"complete": False, "shards": []}
    (part / "manifest.json").write_text(json.dumps(cut))
    (part / "train" / "00001.bin").write_bytes(b"\x01" * 10)
    shutil.rmtree(part / "validation")
    kept = (part / "train" / "00000.bin").stat()
    again = prepare(source_config(corpus), tok_dir, part, num_proc=1, shard_tokens=SHARD_TOKENS, show_progress=False)
    assert again["splits"] == manifest["splits"] and again["tokens"] == manifest["tokens"]
    after = (part / "train" / "00000.bin").stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # the finished shard was kept
    for s in manifest["splits"]["train"]["shards"] + manifest["splits"]["validation"]["shards"]:
        assert (part / s["bin"]).read_bytes() == (out / s["bin"]).read_bytes()


def test_prepare_refuses_a_folder_holding_something_else(tiny, tmp_path):
    corpus, tok_dir, out, _ = tiny
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="already holds other files"):
        prepare(source_config(corpus), tok_dir, other, num_proc=1, show_progress=False)
    assert [p.name for p in other.iterdir()] == ["notes.txt"] and (other / "notes.txt").read_text() == "mine"
    copy = copy_set(out, tmp_path)
    before = (copy / "manifest.json").read_text()
    with pytest.raises(DataError, match="prepared with other sources"):
        prepare(DataConfig(sources=[SourceConfig(kind="jsonl", path=str(corpus), holdout_fraction=0.2)]), tok_dir,
                copy, num_proc=1, shard_tokens=SHARD_TOKENS, show_progress=False)
    assert (copy / "manifest.json").read_text() == before


@pytest.mark.parametrize("damage", ["missing shard", "truncated shard", "corrupt index", "unfinished"])
def test_damaged_set_is_refused_before_compute(tiny, tmp_path, damage):
    _, tok_dir, out, manifest = tiny
    copy = copy_set(out, tmp_path)
    shard = manifest["splits"]["train"]["shards"][1]
    if damage == "missing shard":
        (copy / shard["bin"]).unlink()
        message = "00001.bin is missing"
    elif damage == "truncated shard":
        (copy / shard["bin"]).write_bytes((copy / shard["bin"]).read_bytes()[:-2])
        message = "the shard is corrupt or truncated"
    elif damage == "corrupt index":
        (copy / shard["index"]).write_bytes(b"not an index")
        message = "00001.idx.npy does not match the manifest"
    else:
        m = json.loads((copy / "manifest.json").read_text())
        (copy / "manifest.json").write_text(json.dumps({**m, "complete": False}))
        message = "not finished"
    with pytest.raises(DataError, match=message):
        build_dataloader(loader_config(copy), load_tokenizer(tok_dir))


def test_other_tokenizer_small_set_and_bad_token_ids_are_refused(tiny, tmp_path):
    corpus, tok_dir, out, manifest = tiny
    from seedlm.data_pipeline import train_tokenizer

    other = train_tokenizer(["gamma delta epsilon zeta " * 50] * 20, tmp_path / "tok2", vocab_size=300, max_chars=None)
    with pytest.raises(DataError, match=f"another tokenizer.*tokenizer.path={tok_dir}"):
        build_dataloader(loader_config(out), other)
    tok = load_tokenizer(tok_dir)
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_dataloader(loader_config(out, micro_batch_size=256), tok, 0, 2, grad_accum_steps=2)
    # a token id past the vocabulary: in the manifest, and in the bytes of a shard whose manifest still says fine
    copy = copy_set(out, tmp_path)
    m = json.loads((copy / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["max_token_id"] = len(tok)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=f"holds token id {len(tok)}, outside"):
        build_dataloader(loader_config(copy), tok)
    shard = out / manifest["splits"]["train"]["shards"][0]["bin"]
    bad = copy / manifest["splits"]["train"]["shards"][0]["bin"]
    data = np.fromfile(shard, np.uint16)
    data[:] = 60000
    data.tofile(bad)
    m["splits"]["train"]["shards"][0]["max_token_id"] = manifest["splits"]["train"]["shards"][0]["max_token_id"]
    (copy / "manifest.json").write_text(json.dumps(m))
    loader = build_dataloader(loader_config(copy, micro_batch_size=8, num_workers=0, shuffle=False), tok)
    with pytest.raises(DataError, match="holds token id 60000, outside the tokenizer's 512 tokens"):
        for _ in zip(range(20), loader):
            pass


def test_data_prepare_command_and_a_run_on_prepared_data(tiny, tmp_path, capsys):
    corpus, tok_dir, _, manifest = tiny
    config = tmp_path / "run.yaml"
    config.write_text(f"model: gated_moe_tiny\ndata:\n  sources: [{{kind: jsonl, path: {corpus}, "
                      "holdout_fraction: 0.1}]\n")
    out = tmp_path / "prepared"
    assert seedlm(["data", "prepare", str(config), str(out), "--num-proc", "1", "--no-progress"]) == 2
    assert "add tokenizer.path=DIR" in capsys.readouterr().err and not out.exists()
    argv = ["data", "prepare", str(config), str(out), f"tokenizer.path={tok_dir}", "--num-proc", "2", "--no-progress"]
    assert seedlm(argv) == 0
    printed = capsys.readouterr().out
    assert f"{manifest['tokens']:,} tokens" in printed and f"data.prepared={out}" in printed
    assert seedlm(argv) == 0  # a finished set is left as it is
    run = tmp_path / "run"
    args = tiny_run_overrides(corpus, tok_dir, output_dir=run, max_steps=2, save_interval=2,
                              **{"data.prepared": out, "train.eval_interval": 2, "train.eval_batches": 1})
    assert seedlm(["train", "gated_moe_tiny", *args]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and any("eval_loss" in r for r in records)
    state = torch.load(run / "checkpoints" / "step_00000002" / "rank_00000.pt", weights_only=False)["data"]
    assert state["rows_consumed"] == 2 * 2
    # the run's tokenizer must be named: one that would be trained is refused before anything is built
    no_tok = [a for a in args if not a.startswith("tokenizer.path")] + ["tokenizer.vocab_size=512"]
    assert seedlm(["train", "gated_moe_tiny", *no_tok, f"output_dir={tmp_path / 'run2'}"]) == 2
    assert f"set tokenizer.path={tok_dir}" in capsys.readouterr().err


def test_benchmark_smoke(tiny, capsys):
    from benchmarks.bench_prepared_data import main

    _, tok_dir, _, _ = tiny
    assert main(["--smoke", "--tokenizer", str(tok_dir)]) == 0
    out = capsys.readouterr().out
    assert "| 2 processes |" in out and "| world 4, 0 workers |" in out and "read / step" in out
