"""Helpers shared by the data-pipeline tests (no tests here): tiny corpora and a tiny tokenizer.

Everything is made under a tmp folder by the tests themselves; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud light".split()


def make_docs(prefix: str, n: int, seed: int = 0, min_words: int = 2, max_words: int = 30) -> list[str]:
    """n distinct documents 'prefix0007: word word ...'; the prefix identifies each one after decoding."""
    rng = random.Random(f"{prefix}-{seed}")
    return [
        f"{prefix}{i:04d}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        for i in range(n)
    ]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def write_files(folder: Path, docs: list[str], suffix: str = ".txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"sub{i % 3}" / f"doc{i:04d}{suffix}").parent.mkdir(exist_ok=True)
        (folder / f"sub{i % 3}" / f"doc{i:04d}{suffix}").write_text(d)
    return folder


def tiny_tokenizer(out_dir: Path, model_type: str = "bpe", vocab_size: int = 400):
    from seedlm.data_pipeline import train_tokenizer

    texts = (
        make_docs("doc", 300) + make_docs("alpha", 50) + make_docs("beta", 50) + ["Ünïcødé ñ 日本語 — “quotes” ✓"] * 5
    )
    texts += ["def f(x):\n    return x + 1  # code\n\tindent\n"] * 20
    return train_tokenizer(texts, out_dir, vocab_size=vocab_size, model_type=model_type, max_chars=None)


def segments(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Every segment (token list) of every row of a batch, cut where position_ids restarts at 0."""
    out = []
    for ids, pos in zip(batch["input_ids"], batch["position_ids"]):
        starts = torch.nonzero(pos == 0).reshape(-1).tolist() + [len(pos)]
        out.extend(ids[a:b].tolist() for a, b in zip(starts[:-1], starts[1:]))
    return out


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def assert_same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"batch {i} differs in {k}"


def lane_documents(batches: list[dict[str, torch.Tensor]], tok, lanes: int = 1) -> tuple[list[str], list[str]]:
    """(complete documents, texts of the documents cut at the end) of ONE reader's batches (num_workers=0, one
    rank), rejoined across rows per packing lane: rows come from the lanes in turn, and a lane with nothing
    left is passed over once the stream has ended (data_pipeline.packing.LanePacker)."""
    rows = [[t for t in row.tolist() if t != tok.pad_token_id] for b in batches for row in b["input_ids"]]
    pending: list[list[int] | None] = [None] * lanes
    ended = [False] * lanes
    docs, lane = [], 0
    for row in rows:
        # a lane with no pending document starts a new one (bos) unless the stream has ended: then it is passed over
        while ended[lane] or (pending[lane] is None and row[0] != tok.bos_token_id):
            ended[lane] = True
            assert not all(ended), "a row continues a document that no lane was packing"
            lane = (lane + 1) % lanes
        for t in row:
            if t == tok.bos_token_id:
                assert pending[lane] is None, "a document started before the previous one ended"
                pending[lane] = []
            elif t == tok.eos_token_id:
                docs.append(tok.decode(pending[lane]))
                pending[lane] = None
            else:
                pending[lane].append(t)
        lane = (lane + 1) % lanes
    return docs, [tok.decode(d) for d in pending if d is not None]


def reader_documents(batches: list[dict[str, torch.Tensor]], tok, lanes: int = 1) -> list[str]:
    """The complete documents of ONE reader's batches (see lane_documents)."""
    return lane_documents(batches, tok, lanes)[0]
