"""Model presets and the `seedlm` command line."""

import argparse
import subprocess
import sys

import pytest

from seedlm.launch.cli import build_parser
from seedlm.launch.cli import main as seedlm
from seedlm.launch.presets import MODEL_PRESET_DIR, PresetError, load_model_config


@pytest.mark.parametrize("name", sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml")))
def test_every_model_preset_builds_a_valid_config(name):
    config = load_model_config(name)
    assert config.model_type.startswith("seedlm_")


def test_paper_sizes():
    counts = load_model_config("gated_moe_15a2b").parameter_counts()
    assert 15.0e9 < counts.total < 16.5e9 and 2.0e9 < counts.active < 2.4e9  # "15A2B"
    counts = load_model_config("gated_dense_1p7b").parameter_counts()
    assert 1.6e9 < counts.total < 2.0e9 and counts.total == counts.active
    dense = load_model_config("gated_dense_1p7b")
    assert (dense.num_hidden_layers, dense.num_attention_heads, dense.num_key_value_heads) == (28, 16, 8)
    assert dense.tie_word_embeddings and dense.attn_output_gate == "elementwise"


def test_preset_mistakes_name_the_fix(tmp_path):
    with pytest.raises(PresetError, match="did you mean 'gated_moe_tiny'"):
        load_model_config("gated_moe_tiyn")
    with pytest.raises(PresetError, match="did you mean 'num_experts_per_tok'"):
        load_model_config("gated_moe_tiny", num_expert_per_tok=2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_type: llama\nhidden_size: 8\n")
    with pytest.raises(PresetError, match="not a seedlm model"):
        load_model_config(bad)


def test_help_for_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        seedlm(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out
    commands = list(build_parser()._subparsers._group_actions[0].choices)
    assert "demo" in commands and "convert" in commands
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            seedlm([command, "--help"])
        assert exit_info.value.code == 0


def test_no_subcommand_prints_help_and_fails():
    result = subprocess.run([sys.executable, "-m", "seedlm.launch.cli"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: seedlm" in result.stdout


def test_demo_runs_forward_and_generate(capsys):
    assert seedlm(["demo", "--presets", "gated_moe_tiny", "--seq-len", "8", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "gated_moe_tiny (seedlm_gated_moe)" in out and "generate() 3 tokens" in out


def test_train_help_lists_config_sections_defaults_and_source_forms(capsys):
    with pytest.raises(SystemExit) as exit_info:
        seedlm(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in ("model_overrides", "gated_moe_tiny", "vocab_size=4096", "seq_len=512", "sources=[stdlib]",
                 "max_steps=100", "lr=0.003", "zero_stage=1", "expert_parallel_size=1", "--print-config",
                 "KIND:PATH", "jsonl:data/*.jsonl", "text_field=text", "{kind: K, ...}"):
        assert text in out, text


def parsers_with_options(parser, path=()):
    """(command path, parser) for every parser below `parser` (commands and their actions)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from parsers_with_options(sub, (*path, name))


def test_every_option_shows_its_default_once():
    ours = {"train", "tokenizer", "data", "demo", "bench"}  # whose help texts this repository part writes
    found = dict(parsers_with_options(build_parser()))
    assert {("tokenizer", "train"), ("tokenizer", "encode"), ("data", "view"), ("eval",)} <= set(found)
    for path, parser in found.items():
        assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), path
        if path[0] not in ours:
            continue
        text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.default is not argparse.SUPPRESS and action.help:
                assert "default:" not in action.help, (path, action.dest)  # the formatter adds it
                assert f"(default: {action.default})" in " ".join(text.split()), (path, action.dest)


def test_a_command_module_that_fails_to_import_is_an_error(monkeypatch):
    from seedlm.launch import cli

    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, ("broken", "no_such_command", "a command not built")])
    with pytest.raises(ImportError, match="'broken' command \\(module launch.commands.no_such_command\\)"):
        cli.build_parser()
