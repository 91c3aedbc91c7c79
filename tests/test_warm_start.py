"""`train.init_from`: a new run starts from an exported folder's config, tokenizer and weights, under expert
parallelism too; the mistakes are refused when the config loads, before anything is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from seedlm.launch.cli import main as seedlm
from seedlm.launch.config import ConfigError, load_run_config
from tests.helpers import tiny_run_overrides, write_tiny_corpus_and_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A 2-step gated-MoE run, exported: the folder a user would warm-start from."""
    root = tmp_path_factory.mktemp("warm")
    corpus, tok = write_tiny_corpus_and_tokenizer(root)
    run = root / "run"
    args = tiny_run_overrides(corpus, tok, output_dir=run, max_steps=2, save_interval=2,
                              **{"train.eval_interval": 0})
    assert seedlm(["train", "gated_moe_tiny", *args]) == 0
    assert seedlm(["export", str(run), str(root / "export")]) == 0
    return root / "export", corpus


def warm_args(folder, corpus, out, **fields) -> list[str]:
    """A run whose model and tokenizer come from `folder`: no tokenizer.path, no vocab_size override."""
    args = tiny_run_overrides(corpus, folder, output_dir=out, max_steps=2, save_interval=2,
                              **{"train.eval_interval": 0, "train.init_from": folder, **fields})
    return [a for a in args if not a.startswith(("tokenizer.path=", "model_overrides.vocab_size="))]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def test_the_run_takes_the_folders_config_and_tokenizer(export):
    folder, corpus = export
    run = load_run_config("deltaproduct_tiny", warm_args(folder, corpus, "unused"))  # `model` is not used
    assert run.tokenizer.path == str(folder) and run.train.init_from == str(folder)
    from seedlm.launch.config import model_config_from_run

    config = model_config_from_run(run)
    saved = json.loads((folder / "config.json").read_text())
    assert config.model_type == "seedlm_gated_moe" == saved["model_type"]
    assert (config.hidden_size, config.num_experts, config.vocab_size) == (
        saved["hidden_size"], saved["num_experts"], saved["vocab_size"])


def test_lr_0_from_an_export_on_two_ranks_with_expert_parallelism_exports_the_same_weights(export, tmp_path):
    folder, corpus = export
    run = tmp_path / "warm"
    args = warm_args(folder, corpus, run, **{"train.lr": 0.0, "expert_parallel_size": 2, "zero_stage": 2})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    from seedlm.launch.distributed import free_port

    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "-m", "seedlm.launch.cli", "train", "gated_moe_tiny", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"initial weights from {folder}" in result.stderr
    assert seedlm(["export", str(run), str(tmp_path / "again")]) == 0
    before, after = weights(folder), weights(tmp_path / "again")
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["tokenizer"]["path"] == str(folder) and resolved["train"]["init_from"] == str(folder)


@pytest.mark.parametrize("fields, message", [
    ({"model_overrides.hidden_size": 64}, "change the shapes of the weights"),
    ({"model_overrides.num_expertz": 4}, "unknown field 'num_expertz'"),
    ({"train.init_from": "no/such-model"}, "the Hub is offline"),
    ({"train.init_from": "./no_such_folder"}, "no such folder"),
])
def test_init_from_mistakes_are_refused_before_anything_is_written(export, tmp_path, capsys, fields, message):
    folder, corpus = export
    out = tmp_path / "never"
    assert seedlm(["train", "gated_moe_tiny", *warm_args(folder, corpus, out, **fields)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_folder_that_is_not_a_seedlm_model_says_how_to_convert_it(export, tmp_path):
    folder, corpus = export
    other = tmp_path / "qwen"
    other.mkdir()
    config = json.loads((folder / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_moe"}))
    (other / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"holds a 'qwen3_moe' model.*seedlm convert --from qwen3_moe"):
        load_run_config("gated_moe_tiny", warm_args(other, corpus, tmp_path / "never"))
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ConfigError, match="has a config.json but no weights"):
        load_run_config("gated_moe_tiny", warm_args(empty, corpus, tmp_path / "never"))
