"""`seedlm tokenizer` and `seedlm data` on tiny files, in-process."""

from __future__ import annotations

import pytest
from test_data_helpers import make_docs, write_jsonl

from seedlm.launch.cli import main


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
    assert "continues the document cut at the end of row 0" in out
    view = ["data", "view", "--tokenizer", str(tok_dir), "--source", str(data), "--seq-len", "24", "--rows", "3"]
    assert main([*view, "--packing-lanes", "2"]) == 0
    rows = capsys.readouterr().out.split("=== row")[1:]
    assert "<s>doc0" in rows[0] and "<s>doc0" in rows[1]  # two documents side by side
    assert "continues the document cut at the end of row 0" in rows[2]


def test_clear_error_exit_code(tmp_path, capsys):
    code = main(["tokenizer", "train", "--source", f"jsonl:{tmp_path}/none*.jsonl", "--out", str(tmp_path / "t")])
    assert code == 2
    assert "no files match" in capsys.readouterr().out
    assert main(["data", "view", "--tokenizer", str(tmp_path / "missing")]) == 2
    assert "seedlm tokenizer train" in capsys.readouterr().out


def test_tokenizer_of_an_export_loads_without_the_remote_code_prompt(tmp_path):
    """An export's config.json maps AutoConfig to remote code; loading only its tokenizer must not ask
    "Do you wish to run the custom code?" (with stdin closed as here, transformers prints it and waits)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_data_helpers import tiny_tokenizer

    from seedlm.launch.presets import load_model_config

    export = tmp_path / "export"
    load_model_config("gated_moe_tiny").save_pretrained(export)  # config.json with auto_map + configuration_*.py
    tiny_tokenizer(export)
    assert "auto_map" in (export / "config.json").read_text()
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), HF_MODULES_CACHE=str(tmp_path / "modules"))
    loads = [
        [sys.executable, "-m", "seedlm.launch.cli", "tokenizer", "encode", str(export), "alpha beta"],
        # the data pipeline alone (no seedlm model classes registered)
        [sys.executable, "-c", f"import seedlm.data_pipeline as d; print(len(d.load_tokenizer({str(export)!r})))"],
    ]
    encoded, loaded = [subprocess.run(argv, cwd=repo, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                      text=True, timeout=300) for argv in loads]
    for result in (encoded, loaded):
        assert result.returncode == 0, result.stderr
        assert "custom code" not in result.stdout + result.stderr
    assert "round trip: exact" in encoded.stdout and loaded.stdout.strip() == "400"
