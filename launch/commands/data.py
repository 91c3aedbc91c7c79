"""`seedlm data`: look at what the model will be fed, or tokenise it once ahead of training.

    seedlm data view --tokenizer runs/tok                       # packed rows of the embedded default corpus
    seedlm data view --tokenizer tok --source jsonl:data/*.jsonl --seq-len 256 --rows 2 --split validation
    seedlm data prepare quickstart data/stdlib tokenizer.path=runs/tok --num-proc 8   # then data.prepared=...

Each row is printed segment by segment (a segment is where position_ids count up from 0); a segment
is either a new document (it starts with <s>) or the continuation of one cut at the previous row's end.
"""

from __future__ import annotations

import argparse
import os

from seedlm.data_pipeline.prepared import DEFAULT_SHARD_TOKENS
from seedlm.launch.commands.tokenizer import add_source_arguments, sources_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    view = sub.add_parser(
        "view",
        help="decode a few packed rows with document boundaries marked",
        description="Build the packed loader (one rank, no workers) and decode its first rows, segment by segment.",
        formatter_class=parser.formatter_class,
    )
    view.add_argument("--tokenizer", required=True, default=argparse.SUPPRESS, metavar="DIR",
                      help="tokenizer folder (seedlm tokenizer train), or an exported model folder")
    add_source_arguments(view)
    view.add_argument("--seq-len", type=int, default=128, help="row length in tokens")
    view.add_argument("--rows", type=int, default=3, help="rows to show")
    view.add_argument("--skip", type=int, default=0, help="rows to skip first")
    view.add_argument("--split", choices=["train", "validation"], default="train", help="which split's rows")
    view.add_argument("--seed", type=int, default=0, help="data seed")
    view.add_argument("--packing-lanes", type=int, default=1,
                      help="documents packed side by side, a row from each in turn (a run's data.packing_lanes, "
                           "64 by default); 1 shows each document's rows one after another")
    view.add_argument("--max-chars", type=int, default=400, help="cut each printed segment to this many characters")


    prepare = sub.add_parser(
        "prepare",
        help="tokenise a run config's sources once into memory-mapped token shards (train with data.prepared=DIR)",
        description="Tokenise the train (and validation) split of a run config's data sources with its tokenizer\n"
        "into OUT_DIR: uint16/uint32 token shards, document indexes and manifest.json. Rerun with the same\n"
        "arguments to continue an interrupted run; a finished OUT_DIR is left as it is.",
        formatter_class=parser.formatter_class,
    )
    prepare.add_argument("config", help="run preset name (configs/NAME.yaml) or a YAML file: its data sources "
                                        "and tokenizer.path are used")
    prepare.add_argument("out_dir", metavar="OUT_DIR", help="folder for the prepared set (new or empty, or an "
                                                            "interrupted prepare's to continue)")
    prepare.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                         help="dotted overrides of the run config, e.g. tokenizer.path=runs/tok data.sources=[...]")
    prepare.add_argument("--num-proc", type=int, default=os.cpu_count(), help="tokenising processes")
    prepare.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (a shard "
                         "ends at the first document boundary past it)")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from seedlm.data_pipeline import DataConfig, DataError

    if args.data_command == "prepare":
        return _prepare(args)
    try:
        cfg = DataConfig(
            sources=sources_from_args(args),
            seq_len=args.seq_len,
            micro_batch_size=1,
            num_workers=0,
            seed=args.seed,
            packing_lanes=args.packing_lanes,
        )
        return _view(cfg, args)
    except DataError as err:
        print(f"error: {err}")
        return 2


def _view(cfg, args: argparse.Namespace) -> int:
    from seedlm.data_pipeline import build_dataloader, load_tokenizer, split_segments

    tok = load_tokenizer(args.tokenizer)
    loader = build_dataloader(cfg, tok, split=args.split)
    names = ", ".join(s.describe() for s in cfg.sources)
    print(f"{names} [{args.split}], seq_len {cfg.seq_len}, tokenizer {args.tokenizer} ({len(tok)} tokens)")
    shown = 0
    for n, batch in enumerate(loader):
        if n < args.skip:
            continue
        ids, pos = batch["input_ids"][0], batch["position_ids"][0]  # [T], [T]
        segs = split_segments(ids, pos)
        print(f"\n=== row {n}: {len(segs)} segment(s), {int((batch['labels'][0] != -100).sum())} predicted tokens ===")
        start = 0
        for k, seg in enumerate(segs):
            first = int(seg[0])
            if first == tok.bos_token_id:
                kind = "new document"
            elif first == tok.pad_token_id != tok.eos_token_id:
                kind = "padding"
            else:
                kind = f"continues the document cut at the end of row {n - cfg.lanes()}"
            end = " (ends the document)" if int(seg[-1]) == tok.eos_token_id else ""
            print(f"--- segment {k}: tokens {start}-{start + len(seg) - 1}, {kind}{end} ---")
            text = tok.decode(seg.tolist())  # special tokens shown: <s> starts, </s> ends a document
            if len(text) > args.max_chars:
                half = args.max_chars // 2
                text = f"{text[:half]} [... {len(text) - 2 * half} characters ...] {text[-half:]}"
            print(text)
            start += len(seg)
        shown += 1
        if shown == args.rows:
            break
    return 0


def _prepare(args: argparse.Namespace) -> int:
    import sys

    from seedlm.data_pipeline import DataConfig, prepare
    from seedlm.launch.config import load_run_config
    from seedlm.launch.errors import USER_ERRORS

    try:
        run_config = load_run_config(args.config, args.overrides)
        if "synthetic" in run_config.data:
            print("seedlm data prepare: this run's data is generated (data.synthetic), there is nothing to prepare",
                  file=sys.stderr)
            return 2
        if not run_config.tokenizer.path:
            print(f"seedlm data prepare: the run {args.config} trains its own tokenizer (tokenizer.path is not set); "
                  "prepared tokens need the tokenizer first: train one (seedlm tokenizer train --out DIR, or use a "
                  "run's <output_dir>/tokenizer) and add tokenizer.path=DIR", file=sys.stderr)
            return 2
        config = DataConfig.from_dict(run_config.data)
        manifest = prepare(config, run_config.tokenizer.path, args.out_dir, num_proc=args.num_proc,
                           shard_tokens=args.shard_tokens, show_progress=not args.no_progress)
    except USER_ERRORS as err:
        print(f"seedlm data prepare: {err}", file=sys.stderr)
        return 2
    splits = manifest["splits"]
    held_out = splits["validation"].get("skipped") or f"{splits['validation']['tokens']:,} tokens"
    skipped = {k: v for k, v in manifest["bad_records"].items() if v}
    print(f"prepared {args.out_dir}: {manifest['tokens']:,} tokens in {manifest['documents']:,} documents, "
          f"{len(splits['train']['shards'])} shard(s) of {manifest['dtype']}; validation: {held_out}; bad records "
          f"skipped: {skipped or 'none'}. Train on it with data.prepared={args.out_dir} "
          f"tokenizer.path={run_config.tokenizer.path}")
    return 0
