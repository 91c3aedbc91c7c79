"""Run-config mistakes refused at load and by `seedlm train --print-config`, before anything is computed:
model fields named as written, a tokenizer that does not fit the model's vocabulary, expert parallelism
against the launcher's world size, and the data-source forms of a run config."""

import re

import pytest
import yaml
from test_data_helpers import tiny_tokenizer

from seedlm.launch.cli import main as seedlm
from seedlm.launch.config import ConfigError, load_run_config


def train(capsys, *args) -> tuple[int, str, str]:
    code = seedlm(["train", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_model_field_typo_names_the_override_and_where_it_was_written(tmp_path, capsys):
    code, out, err = train(capsys, "gated_moe_tiny", "model_overrides.num_expertz=4", "--print-config")
    assert code == 2 and out == ""  # nothing printed as if it were valid
    assert "model_overrides.num_expertz (from the command line)" in err and "did you mean 'num_experts'?" in err

    config_file = tmp_path / "run.yaml"
    config_file.write_text("model: gated_moe_tiny\nmodel_overrides:\n  hidden_sizee: 64\n")
    with pytest.raises(ConfigError, match=rf"model_overrides.hidden_sizee \(in {config_file}\).*'hidden_size'"):
        load_run_config(config_file)
    # a field of an inline model mapping, and the same typo given on the command line over a valid file
    config_file.write_text("model: {model_type: seedlm_deltaproduct, num_householdr: 2}\n")
    with pytest.raises(ConfigError, match=r"model.num_householdr \(in .*'num_householder'"):
        load_run_config(config_file)
    with pytest.raises(ConfigError, match=r"model_overrides.num_expert_per_tok \(from the command line\)"):
        load_run_config("gated_moe_tiny", ["model_overrides.num_expert_per_tok=2"])
    # a valid override still loads, and a value the family refuses is refused at load too
    assert load_run_config("gated_moe_tiny", ["model_overrides.num_experts=4"]).model_overrides == {"num_experts": 4}
    with pytest.raises(ValueError, match="num_experts_per_tok=9"):
        load_run_config("gated_moe_tiny", ["model_overrides.num_experts_per_tok=9"])


def test_tokenizer_to_train_larger_than_the_model_is_refused_before_training(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = train(capsys, "gated_moe_tiny", "tokenizer.vocab_size=9000", f"output_dir={run_dir}")
    assert code == 2
    assert "tokenizer.vocab_size=9000 (the tokenizer to train) is larger than the model's vocab_size=4096" in err
    assert not run_dir.exists()  # no run folder, so no tokenizer was trained into it
    code, out, err = train(capsys, "gated_moe_tiny", "tokenizer.vocab_size=9000", "--print-config")
    assert code == 2 and out == "" and "tokenizer.vocab_size=9000" in err
    # fitting sizes pass
    code, out, _ = train(capsys, "gated_moe_tiny", "tokenizer.vocab_size=4096", "--print-config")
    assert code == 0 and yaml.safe_load(out)["tokenizer"]["vocab_size"] == 4096


def test_given_tokenizer_is_loaded_and_checked_first(tmp_path, capsys):
    tiny_tokenizer(tmp_path / "tok", vocab_size=400)
    run_dir = tmp_path / "run"
    args = ["gated_moe_tiny", f"tokenizer.path={tmp_path / 'tok'}", "model_overrides.vocab_size=300"]
    code, _, err = train(capsys, *args, f"output_dir={run_dir}")
    assert code == 2 and "the tokenizer has 400 tokens but the model's vocab_size is 300" in err
    assert not run_dir.exists()
    code, _, err = train(capsys, *args, "--print-config")
    assert code == 2 and "400 tokens" in err
    code, _, err = train(capsys, "gated_moe_tiny", f"tokenizer.path={tmp_path / 'missing'}", "--print-config")
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize(
    "env, overrides, message",
    [
        ({"WORLD_SIZE": "4", "RANK": "0"}, ["expert_parallel_size=2", "zero_stage=3"], "ZeRO stage 3 with expert"),
        ({"WORLD_SIZE": "4", "RANK": "0"}, ["expert_parallel_size=3"], r"divide the number of ranks \(4\).*WORLD_SIZE"),
        ({"SLURM_NTASKS": "3", "SLURM_PROCID": "0"}, ["expert_parallel_size=2"], r"ranks \(3\).*SLURM_NTASKS"),
        ({}, ["expert_parallel_size=2"], r"ranks \(1\).*neither WORLD_SIZE nor SLURM_NTASKS"),
    ],
)
def test_print_config_refuses_expert_parallel_the_run_would_refuse(monkeypatch, capsys, env, overrides, message):
    for key in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, out, err = train(capsys, "gated_moe_tiny", *overrides, "--print-config")
    assert code == 2 and out == ""
    assert err.count("\n") == 1  # one line, no traceback
    assert re.search(message, err), err


def test_print_config_accepts_expert_parallel_that_fits_the_world(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    code, out, _ = train(capsys, "gated_moe_tiny", "expert_parallel_size=2", "zero_stage=2", "--print-config")
    assert code == 0 and yaml.safe_load(out)["train"]["expert_parallel_size"] == 2


def test_run_config_takes_the_command_line_source_strings(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    code, out, _ = train(capsys, "gated_moe_tiny", f"data.sources=[jsonl:{data},stdlib]", "--print-config")
    assert code == 0 and yaml.safe_load(out)["data"]["sources"] == [f"jsonl:{data}", "stdlib"]
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"model: gated_moe_tiny\ndata:\n  sources:\n    - jsonl: {data}\n")  # space after colon
    code, out, err = train(capsys, str(config_file), "--print-config")
    assert code == 2 and out == "" and f"write jsonl:{data} (no space after the colon)" in err


@pytest.mark.parametrize("value, message", [
    ("0", "train.host_mmap_threshold must be a positive number of bytes (or null for glibc's default), got 0"),
    ("-5", "got -5"),
])
def test_a_host_mmap_threshold_that_is_not_a_size_is_refused(capsys, value, message):
    code, out, err = train(capsys, "gated_moe_tiny", f"train.host_mmap_threshold={value}", "--print-config")
    assert code == 2 and out == "" and message in err


def test_a_fixed_host_mmap_threshold_is_set_and_logged():
    """glibc's mallopt takes it (launch/host_memory.py); the user's own MALLOC_MMAP_THRESHOLD_ wins over it. In a
    child process: a fixed threshold cannot be undone, and it would slow the rest of this test session."""
    import os
    import subprocess
    import sys

    code = ("from seedlm.launch.host_memory import set_mmap_threshold as s; "
            "print(s(None)); print(s(1 << 20))")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["host allocator: glibc's default (self-raising mmap threshold)",
                                "host allocator: glibc mmap threshold fixed at 1 MiB (train.host_mmap_threshold)"]
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[1] == "host allocator: MALLOC_MMAP_THRESHOLD_=65536 from the environment"


def test_the_host_allocator_cache_and_a_fixed_threshold_are_not_taken_together(capsys):
    code, out, err = train(capsys, "gated_moe_tiny", "train.host_allocator_cache=true",
                           "train.host_mmap_threshold=1048576", "--print-config")
    assert code == 2 and out == "" and "choose one" in err


def test_flex_attention_is_refused_for_training_without_cuda(capsys):
    code, out, err = train(capsys, "gated_moe_tiny", "train.attn_implementation=flex_attention", "--print-config")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "flex_attention needs CUDA" in err and "use sdpa or varlen_attention" in err


KEEP_FREED_PROBE = """
import resource, sys, torch
from seedlm.launch.host_memory import keep_freed_blocks
if sys.argv[1] == "cache":
    print(keep_freed_blocks())
torch.empty(16 << 20).fill_(1)  # a 64 MiB block, above glibc's largest mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(16 << 20).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_the_host_allocator_cache_reuses_freed_blocks_instead_of_faulting_in_fresh_pages():
    """A step's large blocks: glibc maps and unmaps each one (16k page faults per 64 MiB block); with
    keep_freed_blocks the freed block is reused. In child processes: mallopt cannot be undone."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", KEEP_FREED_PROBE, mode], env=env, capture_output=True,
                             text=True, check=True).stdout.splitlines()
        return out, int(out[-1])

    _, default_faults = faults("default")
    lines, cache_faults = faults("cache")
    assert lines[0] == "host allocator: glibc keeps freed blocks for reuse (train.host_allocator_cache)"
    assert default_faults > 10 * 16_000  # every block faulted in afresh
    # measured: 1-3 blocks' pages over the ten (a small allocation can land in a freed block and split it)
    assert cache_faults < default_faults / 2
    env["MALLOC_MMAP_MAX_"] = "4"
    lines, _ = faults("cache")
    assert lines[0] == "host allocator: MALLOC_MMAP_MAX_=4 from the environment"
