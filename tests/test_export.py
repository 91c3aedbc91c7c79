"""`seedlm export`, `seedlm push` and their help: an export of a real tiny run loads with every Auto class
without seedlm, its files (and the checkpoints' hf/ folders) get the umask's mode, push without a token
refuses before any network, and every option says what it does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seedlm.launch.cli import build_parser
from seedlm.launch.cli import main as seedlm
from seedlm.launch.export import use_umask_file_modes
from tests.helpers import (
    file_modes,
    load_with_every_auto_class_without_seedlm,
    reference_outputs,
    tiny_run_overrides,
    umask_set_to,
    write_tiny_corpus_and_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step gated-MoE run (one checkpoint), trained once under umask 022 for the tests below."""
    root = tmp_path_factory.mktemp("export_run")
    corpus, tok = write_tiny_corpus_and_tokenizer(root)
    overrides = tiny_run_overrides(corpus, tok, output_dir=root / "run", max_steps=2, save_interval=2,
                                   **{"train.eval_interval": 0})
    with umask_set_to(0o022):
        assert seedlm(["train", "gated_moe_tiny", *overrides]) == 0
    return root / "run"


def test_export_of_a_run_loads_with_every_auto_class_without_seedlm(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    assert seedlm(["export", str(tiny_run), str(tmp_path / "export")]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    # seedlm's own model of the checkpoint the export was made from
    reference = AutoModelForCausalLM.from_pretrained(tiny_run / "checkpoints" / "step_00000002" / "hf").eval()
    outputs = reference_outputs(reference, torch.randint(0, 512, (2, 12)))
    ok = load_with_every_auto_class_without_seedlm([(tmp_path / "export", outputs, True)], tmp_path)
    assert [line.split()[2:] for line in ok] == [["GatedMoeConfig", "GatedMoeModel", "GatedMoeForCausalLM"]]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"])
def test_every_exported_file_gets_the_umask_mode(tiny_run, tmp_path, umask, mode):
    with umask_set_to(umask):
        assert seedlm(["export", str(tiny_run), str(tmp_path / "export")]) == 0
    modes = file_modes(tmp_path / "export")
    assert "model.safetensors" in modes and "config.json" in modes and "README.md" in modes
    assert {name: oct(m) for name, m in modes.items() if m != mode} == {}


def test_checkpoint_hf_folders_get_the_umask_mode(tiny_run):
    modes = file_modes(tiny_run / "checkpoints" / "step_00000002" / "hf")  # written under umask 022
    assert "model.safetensors" in modes
    assert {name: oct(m) for name, m in modes.items() if m != 0o644} == {}


def test_use_umask_file_modes_changes_modes_only(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, text in [("weights.bin", "w"), ("sub/config.json", "{}")]:
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o600)
    with umask_set_to(0o027):
        use_umask_file_modes(tmp_path)
        assert os.umask(0o027) == 0o027  # the umask itself is left as it was
    assert file_modes(tmp_path) == {"weights.bin": 0o640, "sub/config.json": 0o640}
    assert (tmp_path / "weights.bin").read_text() == "w" and (tmp_path / "sub/config.json").read_text() == "{}"


def test_push_without_a_token_refuses_before_any_network(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"0" * 10)
    # a fresh HF_HOME holds no login cache; offline, any Hub call would fail with another message
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "seedlm.launch.cli", "push", str(folder), "someone/tiny"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "seedlm push: no Hugging Face token: set HF_TOKEN or run `hf auth login` (huggingface_hub's CLI), "
        "then push again"
    )
    assert "huggingface-cli" not in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("command", ["export", "convert", "push"])
def test_every_option_has_help_text(command):
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    parser = subparsers.choices[command]
    undocumented = [a.option_strings or a.dest for a in parser._actions if a.dest != "help" and not a.help]
    assert undocumented == []
    assert parser.format_help().count("\n") > 5
