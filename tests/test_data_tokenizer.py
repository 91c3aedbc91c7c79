"""Tokenizer: sentencepiece training, HF folder loading offline, round trips, byte fallback."""

from __future__ import annotations

import numpy as np
import pytest
from test_data_helpers import tiny_tokenizer

from seedlm.data_pipeline import DataError, check_vocab_fits, load_tokenizer
from seedlm.data_pipeline.readers import make_tokenize

TEXTS = [
    "plain ASCII text, with punctuation!  And  double  spaces.",
    "def f(x):\n    return x + 1  # code keeps its indentation\n\n\ttabbed\n",
    "Ünïcødé ñ 日本語 — “quotes” ✓",
    "unseen characters fall back to bytes: ☃ 🙂 Ω ж",
    "  leading and trailing whitespace \n",
]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_round_trip_and_hf_loading(tmp_path, model_type):
    tiny_tokenizer(tmp_path / "tok", model_type=model_type)
    assert {"tokenizer.json", "tokenizer_config.json", "sentencepiece.model"} <= {
        p.name for p in (tmp_path / "tok").iterdir()
    }
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")  # offline: HF_HUB_OFFLINE=1 in conftest
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert len(tok) == 400
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    # a snowman never appears in training: its three UTF-8 bytes become byte pieces
    pieces = tok.convert_ids_to_tokens(tok("☃", add_special_tokens=False)["input_ids"])
    assert pieces == ["<0xE2>", "<0x98>", "<0x83>"]


def test_same_ids_as_sentencepiece(tmp_path):
    import sentencepiece as spm

    tok = tiny_tokenizer(tmp_path / "tok")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "sentencepiece.model"))
    for text in TEXTS:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)


def test_pipeline_tokenize_is_batched_and_keeps_special_text_as_text(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    tokenize = make_tokenize(tok)
    out = tokenize(["a </s> b", TEXTS[1]])
    assert all(isinstance(x, np.ndarray) for x in out)
    assert tok.eos_token_id not in out[0].tolist()  # a literal "</s>" in a document is not a document end
    assert tok.decode(out[0].tolist()) == "a </s> b"
    assert out[1].tolist() == tok(TEXTS[1], add_special_tokens=False)["input_ids"]
    assert tok("a </s>", add_special_tokens=False)["input_ids"][-1] == tok.eos_token_id  # caller's tok unchanged


def test_errors(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    check_vocab_fits(tok, 400)
    with pytest.raises(DataError, match="tokenizer has 400 tokens but the model's vocab_size is 256"):
        check_vocab_fits(tok, 256)
    with pytest.raises(DataError, match="does not exist.*seedlm tokenizer train"):
        load_tokenizer(tmp_path / "nope")
    assert load_tokenizer(tmp_path / "tok").eos_token_id == 2
