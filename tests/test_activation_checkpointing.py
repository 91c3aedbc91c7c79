"""train.activation_checkpointing = none | full | selective: the same gradients, fewer bytes kept for backward
(full < selective < none), config mistakes refused with a message, and the old booleans still accepted."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seedlm.launch.config import ConfigError, TrainConfig, load_run_config
from seedlm.launch.engine import apply_activation_checkpointing
from seedlm.launch.metrics import saved_bytes_for_backward
from seedlm.model import DeltaProductConfig, DeltaProductForCausalLM, GatedMoeConfig, GatedMoeForCausalLM

MODES = ("none", "full", "selective")


def tiny_model(family: str, hidden=32, layers=4, vocab=64):
    """A small model of each family; the DeltaProduct one is hybrid (layer 1 is gated attention)."""
    torch.manual_seed(0)
    if family == "gated_moe":
        config = GatedMoeConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden,
                                shared_expert_intermediate_size=hidden, max_position_embeddings=1024)
        model = GatedMoeForCausalLM(config)
        with torch.no_grad():  # spread the router so top-k choices are not near-ties
            for block in model.moe_blocks():
                block.gate.weight.normal_(0, 0.5)
    else:
        config = DeltaProductConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_heads=2,
                                    head_dim=hidden // 2, num_householder=2, intermediate_size=2 * hidden,
                                    attn_layers=[1], attn_num_heads=2)
        model = DeltaProductForCausalLM(config)
    return model


def checkpointed(family: str, mode: str, every: int = 2, **sizes):
    model = tiny_model(family, **sizes).train()
    apply_activation_checkpointing(model, TrainConfig(activation_checkpointing=mode,
                                                      activation_checkpointing_every=every))
    return model


@pytest.mark.parametrize("family", ["gated_moe", "deltaproduct"])
def test_each_mode_checkpoints_the_layers_it_names(family):
    flags = {mode: [layer.gradient_checkpointing for layer in checkpointed(family, mode).model.layers]
             for mode in MODES}
    assert flags == {"none": [False] * 4, "full": [True] * 4, "selective": [True, False, True, False]}
    every_three = checkpointed(family, "selective", every=3)
    assert [layer.gradient_checkpointing for layer in every_three.model.layers] == [True, False, False, True]


@pytest.mark.parametrize("family", ["gated_moe", "deltaproduct"])
def test_gradients_are_the_same_in_every_mode(family):
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in MODES:
        model = checkpointed(family, mode).to(torch.float64)
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    for mode in ("full", "selective"):
        torch.testing.assert_close(grads[mode][0], grads["none"][0], rtol=0, atol=1e-12)
        assert grads[mode][1].keys() == grads["none"][1].keys()
        for name, grad in grads["none"][1].items():
            torch.testing.assert_close(grads[mode][1][name], grad, rtol=1e-10, atol=1e-12, msg=f"{mode} {name}")


@pytest.mark.parametrize("family", ["gated_moe", "deltaproduct"])
def test_saved_bytes_order_full_then_selective_then_none(family):
    ids = torch.randint(0, 64, (1, 256), generator=torch.Generator().manual_seed(0))
    saved = {}
    for mode in MODES:
        model = checkpointed(family, mode, hidden=64)
        saved[mode] = saved_bytes_for_backward(lambda model=model: model(ids, labels=ids).loss)
    assert saved["full"] < saved["selective"] < saved["none"], saved


@pytest.mark.parametrize("value, expected", [("true", "full"), ("false", "none"), ("full", "full"),
                                             ("selective", "selective"), ("none", "none")])
def test_old_booleans_and_the_modes_are_accepted(value, expected):
    run = load_run_config(None, [f"train.activation_checkpointing={value}"])
    assert run.train.activation_checkpointing == expected
    assert run.train.activation_checkpointing_every == 2 and run.train.lr == TrainConfig.lr  # nothing else moved


def test_old_boolean_in_a_yaml_file_is_accepted(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  activation_checkpointing: true\n  lr: 0.001\n")
    run = load_run_config(config)
    assert run.train.activation_checkpointing == "full" and run.train.lr == 0.001


@pytest.mark.parametrize("override, message", [
    ("train.activation_checkpointing=selectiv",
     "train.activation_checkpointing='selectiv' is not allowed; use one of ['none', 'full', 'selective']"),
    ("train.activation_checkpointing=2",
     "train.activation_checkpointing must be str, got 2"),
    ("train.activation_checkpointing_every=1",
     "train.activation_checkpointing_every must be >= 2, got 1; one layer in one is "
     "train.activation_checkpointing=full"),
])
def test_config_mistakes_are_refused_with_the_allowed_values(override, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, ["train.activation_checkpointing=selective", override])
    assert str(err.value) == message


def test_the_benchmark_smoke_prints_its_table():
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_activation_checkpointing.py"), "--smoke"],
                            cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| gated_moe |")
            or line.startswith("| deltaproduct |")]
    assert [row.split(" | ")[:2] for row in rows] == [["| " + f, m] for f in ("gated_moe", "deltaproduct")
                                                      for m in MODES]
