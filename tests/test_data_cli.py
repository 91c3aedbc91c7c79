"""`seedlm tokenizer` and `seedlm data` on tiny files, in-process."""

from __future__ import annotations

import pytest
from test_data_helpers import make_docs, write_jsonl

from launch.cli import main


def test_help(capsys):
    for argv in (["tokenizer", "--help"], ["tokenizer", "train", "--help"], ["data", "view", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--vocab-size" in out and "--seq-len" in out


def test_train_encode_view(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", make_docs("doc", 200))
    tok_dir = tmp_path / "tok"
    argv = ["tokenizer", "train", "--source", f"jsonl:{data}", "--vocab-size", "320", "--max-chars", "0"]
    assert main([*argv, "--out", str(tok_dir)]) == 0
    assert (tok_dir / "tokenizer.json").is_file()

    assert main(["tokenizer", "encode", str(tok_dir), "doc0001: alpha ☃"]) == 0
    assert "round trip: exact" in capsys.readouterr().out

    assert (
        main(["data", "view", "--tokenizer", str(tok_dir), "--source", str(data), "--seq-len", "24", "--rows", "3"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("=== row") == 3
    assert "new document" in out and "<s>doc0" in out and "</s>" in out
    assert "continues the document cut at the previous row's end" in out


def test_clear_error_exit_code(tmp_path, capsys):
    code = main(["tokenizer", "train", "--source", f"jsonl:{tmp_path}/none*.jsonl", "--out", str(tmp_path / "t")])
    assert code == 2
    assert "no files match" in capsys.readouterr().out
    assert main(["data", "view", "--tokenizer", str(tmp_path / "missing")]) == 2
    assert "seedlm tokenizer train" in capsys.readouterr().out
