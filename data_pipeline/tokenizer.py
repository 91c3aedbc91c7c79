"""Tokenizer: train a sentencepiece model from a text stream and save it as a transformers tokenizer folder.

The folder loads offline with `transformers.AutoTokenizer.from_pretrained(folder)` (a `tokenizer.json`
for the `tokenizers` library, with bos `<s>`, eos `</s>`, pad `<pad>`, unk `<unk>`), and keeps the
trained `sentencepiece.model` beside it for reference.

Choices, and why:
- identity normalisation, no dummy prefix, no whitespace collapsing: decode(encode(text)) == text,
  which code and other whitespace-heavy text need;
- byte fallback: characters never seen in training become their UTF-8 bytes (`<0xNN>` pieces), so no
  text maps to `<unk>`;
- training sentences are the lines of each document; pieces may span spaces (indentation, `):`),
  never newlines. The `tokenizers` pipeline mirrors this: spaces become `▁`, text is split at
  newlines, each newline is its byte piece `<0x0A>`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .config import DataError

SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
_MAX_LINE_CHARS = 4096  # longer lines are cut into pieces of this size for sentencepiece training


def _training_lines(texts: Iterable[str], max_chars: int | None, max_docs: int | None, progress: Any) -> Iterator[str]:
    """Lines of the documents until a character or document budget is spent."""
    yield from _budgeted_lines(texts, max_chars, max_docs, progress)
    if progress is not None:  # sentencepiece now builds the vocabulary, which takes a while with no progress
        progress.set_postfix_str("text read; sentencepiece is building the vocabulary")


def _budgeted_lines(texts: Iterable[str], max_chars: int | None, max_docs: int | None, progress: Any) -> Iterator[str]:
    chars = 0
    for n, text in enumerate(texts):
        if max_docs is not None and n >= max_docs:
            return
        for line in text.split("\n"):
            if not line.strip():
                continue
            for i in range(0, len(line), _MAX_LINE_CHARS):
                piece = line[i : i + _MAX_LINE_CHARS]
                yield piece
                chars += len(piece)
                if progress is not None:
                    progress.update(len(piece))
                if max_chars is not None and chars >= max_chars:
                    return


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    max_chars: int | None = 20_000_000,
    max_docs: int | None = None,
    character_coverage: float = 0.9995,
    num_threads: int = 2,
    show_progress: bool = False,
) -> Any:
    """Train a sentencepiece model on `texts` and save a transformers tokenizer folder at `out_dir`.

    Returns the loaded transformers tokenizer.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size < 300:
        raise DataError(
            f"vocab_size={vocab_size} is too small: 256 byte-fallback pieces and 4 special tokens come first"
        )
    progress = None
    if show_progress:
        from tqdm import tqdm

        progress = tqdm(total=max_chars, unit="char", unit_scale=True, desc="tokenizer training text")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts, max_chars, max_docs, progress),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_by_whitespace=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=character_coverage,
            max_sentence_length=4 * _MAX_LINE_CHARS,  # bytes; lines are cut at _MAX_LINE_CHARS characters
            hard_vocab_limit=False,  # a small corpus gives a smaller vocabulary instead of an error
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise DataError(
            f"sentencepiece training failed: {err}. Is the text budget large enough for the vocabulary?"
        ) from err
    finally:
        if progress is not None:
            progress.close()
    return save_sentencepiece_as_hf(model.getvalue(), out_dir)


def save_sentencepiece_as_hf(model_proto: bytes, out_dir: str | os.PathLike) -> Any:
    """Build a `tokenizers` tokenizer equal to the sentencepiece model and save it as a HF folder."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        model = models.BPE(
            vocab=vocab,
            merges=_bpe_merges(pieces, vocab),
            unk_token=SPECIAL_TOKENS["unk"],
            byte_fallback=True,
            fuse_unk=True,
        )
    else:
        model = models.Unigram([(piece, score) for piece, score, _ in pieces], unk_id=0, byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\n"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=1_000_000_000,  # packing, not the tokenizer, decides lengths
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    (out / "sentencepiece.model").write_bytes(model_proto)
    (out / "seedlm_tokenizer.json").write_text(
        json.dumps({"model_type": "bpe" if isinstance(model, models.BPE) else "unigram", "vocab_size": len(pieces)})
        + "\n"
    )
    return AutoTokenizer.from_pretrained(out)


def _bpe_merges(pieces: list[tuple[str, float, int]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges that rebuild sentencepiece's BPE pieces, in sentencepiece's priority order.

    A sentencepiece BPE piece's id is its merge rank; every split of a normal piece into two pieces of
    the vocabulary is a merge ranked by the merged piece, then by the parts.
    """
    normal = 1  # sentencepiece ModelProto.SentencePiece.Type.NORMAL
    ranked = []
    for piece, i in vocab.items():
        if pieces[i][2] != normal or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((i, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Load a tokenizer folder offline-friendly, checking it has what packing needs (an eos token).

    Without remote code: a tokenizer needs none (ours is a plain `tokenizers` one), but in an exported model
    folder the config's `auto_map` would make transformers ask "Do you wish to run the custom code?" on the
    terminal (and wait for an answer) while it only looks for the tokenizer class."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise DataError(f"tokenizer folder {path} does not exist; train one with `seedlm tokenizer train --out {path}`")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load the tokenizer in {path}: {err}") from err
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer in {path} has no eos token; packing needs one to separate documents")
    return tok


def check_vocab_fits(tokenizer: Any, model_vocab_size: int) -> None:
    """Raise before training when token ids could index past the model's embedding table."""
    n = len(tokenizer)
    if n > model_vocab_size:
        raise DataError(
            f"the tokenizer has {n} tokens but the model's vocab_size is {model_vocab_size}; set the model's "
            f"vocab_size >= {n} (a multiple of 64 is common) or train a smaller tokenizer"
        )
