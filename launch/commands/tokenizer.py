"""`seedlm tokenizer`: train a sentencepiece tokenizer from a text stream, or inspect one.

seedlm tokenizer train --out runs/tok                       # the embedded default corpus (stdlib *.py)
seedlm tokenizer train --source jsonl:data/*.jsonl --vocab-size 32000 --max-chars 200000000 --out tok
seedlm tokenizer train --source hub:owner/name --hub-split train --text-field text --out tok
seedlm tokenizer encode tok "some text"                     # ids, pieces, and whether decode round-trips
"""

from __future__ import annotations

import argparse

SOURCE_HELP = (
    "a text source: 'stdlib' (the embedded corpus, used when no --source or --config is given), KIND:PATH with "
    "KIND in jsonl, parquet, text, files, hub (e.g. jsonl:data/*.jsonl, files:docs/, hub:owner/name), or a "
    ".jsonl/.parquet/.txt path; repeat to mix. The same strings work in a run config's data.sources list"
)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Options naming the text sources; shared with `seedlm data`."""
    parser.add_argument("--source", action="append", metavar="SPEC", help=SOURCE_HELP)
    parser.add_argument("--config", metavar="YAML", help="take the sources from a YAML file's `data:` section")
    parser.add_argument("--text-field", default="text", help="field/column holding the text (jsonl, parquet, hub)")
    parser.add_argument("--glob", help="file pattern under a folder source (e.g. '**/*.md'); None: every file "
                                       "of the source's kind")
    parser.add_argument("--hub-config", help="Hub dataset config name; None: the dataset's default")
    parser.add_argument("--hub-split", default="train", help="Hub dataset split used for training")


def sources_from_args(args: argparse.Namespace) -> list:
    from seedlm.data_pipeline import SourceConfig, load_data_config

    if args.config:
        if args.source:
            raise SystemExit("error: give --source or --config, not both")
        return load_data_config(args.config).sources
    overrides = {"text_field": args.text_field, "glob": args.glob, "name": args.hub_config, "split": args.hub_split}
    return [SourceConfig.from_spec(spec, **overrides) for spec in (args.source or ["stdlib"])]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    train = sub.add_parser(
        "train",
        help="train a sentencepiece tokenizer and save it as a transformers tokenizer folder",
        description="Train a sentencepiece model (byte fallback; bos <s>, eos </s>, pad <pad>) on the training\n"
        "split of the sources and save a folder that AutoTokenizer.from_pretrained loads.",
        formatter_class=parser.formatter_class,
    )
    add_source_arguments(train)
    train.add_argument("--out", required=True, default=argparse.SUPPRESS, metavar="DIR",
                       help="output tokenizer folder")  # required: no default to show
    train.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size")
    train.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="sentencepiece model type")
    train.add_argument("--max-chars", type=int, default=20_000_000, help="character budget of training text (0 = all)")
    train.add_argument("--max-docs", type=int, default=None, help="document budget; None: no limit")
    train.add_argument("--seed", type=int, default=0, help="seed of the document order")
    train.add_argument("--threads", type=int, default=2, help="sentencepiece training threads")

    encode = sub.add_parser("encode", help="show how a tokenizer folder encodes a text",
                            formatter_class=parser.formatter_class)
    encode.add_argument("tokenizer", metavar="DIR", help="tokenizer folder, or an exported model folder")
    encode.add_argument("text", help="text to encode")


def run(args: argparse.Namespace) -> int:
    from seedlm.data_pipeline import DataError

    try:
        if args.tokenizer_command == "train":
            return _train(args)
        return _encode(args)
    except DataError as err:
        print(f"error: {err}")
        return 2


def _train(args: argparse.Namespace) -> int:
    from seedlm.data_pipeline import iter_texts, open_source, train_tokenizer

    sources = [open_source(s, "train") for s in sources_from_args(args)]  # held-out documents stay unseen
    names = ", ".join(s.config.describe() for s in sources)
    print(f"training a {args.model_type} tokenizer, vocab {args.vocab_size}, on {names}")
    tok = train_tokenizer(
        iter_texts(sources, seed=args.seed),
        args.out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        max_chars=args.max_chars or None,
        max_docs=args.max_docs,
        num_threads=args.threads,
        show_progress=True,
    )
    print(f"saved {args.out}: {len(tok)} tokens; load it with AutoTokenizer.from_pretrained({str(args.out)!r})")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from seedlm.data_pipeline import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids = tok(args.text, add_special_tokens=False)["input_ids"]
    print(f"{len(ids)} tokens ({len(args.text)} characters)")
    print("ids:   ", ids)
    print("pieces:", tok.convert_ids_to_tokens(ids))
    print("round trip:", "exact" if tok.decode(ids) == args.text else f"differs: {tok.decode(ids)!r}")
    return 0
