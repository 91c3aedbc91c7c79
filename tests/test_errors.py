"""Which errors `seedlm train` shows as one line (exit 2) and which it must not: a user's configuration
mistake is one line; a ValueError raised inside training is a bug and keeps its traceback."""

import os
import subprocess
import sys
from pathlib import Path

from seedlm.launch.cli import main as seedlm
from seedlm.launch.errors import USER_ERRORS
from tests.helpers import tiny_run_overrides, write_tiny_corpus_and_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_user_errors_are_the_projects_own_classes():
    assert ValueError not in USER_ERRORS
    for error in USER_ERRORS:
        assert error.__module__.startswith("seedlm."), error


def test_a_model_config_mistake_is_one_line_and_exit_2(capsys):
    # the config class's own check (heads must divide), given as an override: not a traceback
    code = seedlm(["train", "gated_moe_tiny", "model_overrides.num_key_value_heads=3", "--print-config"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1, err  # one line, no traceback
    assert err.startswith("seedlm train: model 'gated_moe_tiny' with model_overrides {'num_key_value_heads': 3}:")
    assert "num_key_value_heads" in err


def test_a_value_error_inside_training_keeps_its_traceback(tmp_path):
    # chunk_size=0 is not checked by the config: the kernel raises ValueError in the first forward pass,
    # deep inside the trainer. That is a bug to see in full, not a user mistake to print as one line.
    corpus, tok = write_tiny_corpus_and_tokenizer(tmp_path)
    run_dir = tmp_path / "run"
    args = ["deltaproduct_tiny", *tiny_run_overrides(corpus, tok, output_dir=run_dir, max_steps=2),
            "model_overrides.chunk_size=0"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "seedlm.launch.cli", "train", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode not in (0, 2), result.stderr[-3000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert "ValueError: chunk_size must be a positive int, got 0" in result.stderr
    assert "seedlm train: chunk_size" not in result.stderr  # not swallowed into the one-line form
