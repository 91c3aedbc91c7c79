"""train.compile: each decoder block compiled in place (regional compilation) under DeepSpeed gives the eager
losses, keeps the parameter names, and a combination it cannot run is refused before compute."""

import json
from pathlib import Path

import pytest
import torch

from seedlm.launch.cli import main as seedlm
from seedlm.launch.engine import compile_blocks
from tests.helpers import tiny_run_overrides, write_tiny_corpus_and_tokenizer
from tests.test_gated_moe import make_model as make_gated_moe


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    return write_tiny_corpus_and_tokenizer(tmp_path_factory.mktemp("corpus"))


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_compile_blocks_compiles_each_decoder_layer_and_keeps_parameter_names():
    model = make_gated_moe(dtype=torch.float32)
    names = list(model.state_dict())
    assert compile_blocks(model, backend="eager") == model.config.num_hidden_layers
    assert list(model.state_dict()) == names
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model.model.embed_tokens._compiled_call_impl is None  # outside the blocks stays eager


@pytest.mark.parametrize("model", ["gated_moe_tiny", "deltaproduct_tiny"])
def test_compiled_blocks_train_with_the_eager_losses(corpus_and_tokenizer, tmp_path, model):
    # aot_eager traces each block with dynamo and AOTAutograd as inductor does, without the C++ code generation
    # that takes minutes on a CPU; benchmarks/bench_compile.py runs inductor
    corpus, tok = corpus_and_tokenizer
    for name, compile_args in [("eager", {}), ("compiled", {"train.compile": "true",
                                                            "train.compile_backend": "aot_eager"})]:
        args = tiny_run_overrides(corpus, tok, output_dir=tmp_path / name, max_steps=3, zero_stage=1,
                                  **{"train.eval_interval": 0, "train.save_interval": 100}, **compile_args)
        torch._dynamo.utils.counters.clear()
        assert seedlm(["train", model, *args]) == 0
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (name == "compiled"), graphs  # the compiled run really traced its blocks
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == 3
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compile_with_zero3_is_refused_before_compute(corpus_and_tokenizer, tmp_path, capsys):
    corpus, tok = corpus_and_tokenizer
    args = tiny_run_overrides(corpus, tok, output_dir=tmp_path / "run", max_steps=1, zero_stage=3,
                              **{"train.compile": "true"})
    assert seedlm(["train", "gated_moe_tiny", *args]) != 0
    assert "train.compile=true with zero_stage=3 is not supported" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
