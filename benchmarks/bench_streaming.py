"""Streaming sources: bytes read against bytes used when readers share a file, and what a resume re-reads.

Bytes are counted by the kernel (`rchar` of /proc/self/io: every byte this process read through read/pread),
so the numbers do not depend on load and need no rounds. Linux only.

  - one Parquet file of 8 row groups read by 4 readers: each reader reads only its pieces (`reader_pieces`,
    two row groups each), against every reader reading the whole file (the previous round-robin);
  - one jsonl file read by 4 readers (byte ranges), the same comparison;
  - a streaming resume from the middle of a jsonl file: the bytes the resumed loader reads before its first
    batch, against the saved position's byte offset (what re-streaming the shard from its start reads).

    python benchmarks/bench_streaming.py            # 8 row groups x 4096 documents
    python benchmarks/bench_streaming.py --smoke    # small files; checks that it runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def bytes_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def read_all(source, pieces) -> int:
    """Bytes read while reading these (shard, start, stop) pieces of a source."""
    before = bytes_read()
    for shard, start, stop in pieces:
        for _ in source.iter_records(shard, start, stop):
            pass
    return bytes_read() - before


def readers_table(source, path: Path, num_readers: int) -> list[tuple[str, int, float]]:
    from seedlm.data_pipeline.readers import reader_pieces

    used = path.stat().st_size
    split = sum(read_all(source, reader_pieces(source, r, num_readers)) for r in range(num_readers))
    whole = sum(read_all(source, [(0, 0, None)]) for _ in range(num_readers))
    return [("split by piece", split, split / used), ("each reader reads the file", whole, whole / used)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs-per-group", type=int, default=4096)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_data_helpers import make_docs, take, tiny_tokenizer, write_jsonl

    from seedlm.data_pipeline import DataConfig, SourceConfig, build_dataloader, open_source

    n = 64 if args.smoke else args.docs_per_group
    docs = make_docs("doc", 8 * n, max_words=200)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parquet = tmp / "one.parquet"
        pq.write_table(pa.table({"text": docs}), parquet, row_group_size=n)
        jsonl = write_jsonl(tmp / "one.jsonl", docs)
        print("| source (4 readers) | reading | bytes read | bytes read / file size |")
        print("|---|---|---:|---:|")
        for kind, path in (("Parquet, 8 row groups", parquet), ("jsonl", jsonl)):
            source = open_source(SourceConfig(kind="parquet" if kind.startswith("P") else "jsonl", path=str(path)))
            for how, nbytes, ratio in readers_table(source, path, 4):
                print(f"| {kind} | {how} | {nbytes:,} | {ratio:.2f} |")

        tok = tiny_tokenizer(tmp / "tok")
        cfg = DataConfig(sources=[SourceConfig(kind="jsonl", path=str(jsonl))], seq_len=256, micro_batch_size=8,
                         num_workers=0, shuffle_buffer=64)
        loader = build_dataloader(cfg, tok)
        take(loader, len(docs) // 40)
        state = loader.state_dict()
        (position,) = [s["key"] for s in state["loader"]["dataset_state"]["stream"]["sources"]]
        resumed = build_dataloader(cfg, tok)
        resumed.load_state_dict(state)
        before = bytes_read()
        next(iter(resumed))
        reread = bytes_read() - before
        print()
        print("| streaming resume (jsonl, shuffle_buffer 64) | bytes |")
        print("|---|---:|")
        print(f"| file size | {jsonl.stat().st_size:,} |")
        print(f"| saved position (re-read by re-streaming the shard from its start) | {position:,} |")
        print(f"| read by the resumed loader up to its first batch (the current block, tokenizer files) | {reread:,} |")


if __name__ == "__main__":
    main()
