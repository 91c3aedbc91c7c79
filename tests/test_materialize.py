"""Meta-device construction (launch/materialize.py): every rank materialises only what it owns, and one seed
gives bit-identical initial weights under any world size, ZeRO stage and expert-parallel size."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from seedlm.launch.cli import main as seedlm
from seedlm.launch.materialize import build_meta_model, is_materialized, materialize, module_seed
from seedlm.launch.presets import MODEL_PRESET_DIR, build_model_config, load_model_config
from tests.helpers import tiny_run_overrides, write_tiny_corpus_and_tokenizer

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["gated_moe_tiny", "deltaproduct_tiny", "deltaproduct_hybrid_moe"]


def small_config(name):
    """The tiny presets, and the hybrid preset's structure (attention layer, shared expert, tied head) at test size."""
    if name != "deltaproduct_hybrid_moe":
        return load_model_config(name)
    fields = dict(yaml.safe_load((MODEL_PRESET_DIR / f"{name}.yaml").read_text()), vocab_size=256, hidden_size=64,
                  num_hidden_layers=3, num_heads=2, head_dim=32, attn_layers=[1], attn_num_heads=2,
                  attn_num_kv_heads=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  shared_expert_intermediate_size=32)
    return build_model_config(fields)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_materialized_model_is_initialised_as_from_config_would_be(name):
    """Same parameter names, shapes and dtypes as from_config, every parameter real; the deterministic parts of
    the init (norms at 1, zero biases, the padding row, the rotary tables, forget-gate ranges) are the same, and
    the random parts have from_config's scale; tied weights stay one tensor."""
    config = small_config(name)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config)
    model = build_meta_model(config)
    assert not is_materialized(model) and all(p.is_meta for p in model.parameters())
    materialize(model, seed=0)
    assert is_materialized(model)
    ours, ref = dict(model.named_parameters()), dict(reference.named_parameters())
    assert ours.keys() == ref.keys()
    for key, value in ref.items():
        assert ours[key].shape == value.shape and ours[key].dtype == value.dtype, key
        assert torch.isfinite(ours[key]).all(), key
        if value.numel() == 1 or value.std() == 0:  # constant: norms at 1, zero biases
            assert torch.equal(ours[key], value), key
        elif value.numel() >= 256:  # random: the same distribution, so the same scale
            assert ours[key].std().item() == pytest.approx(value.std().item(), rel=0.25), key
    for key, buffer in reference.named_buffers():
        assert torch.equal(dict(model.named_buffers())[key], buffer), key
    if config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    pad = config.pad_token_id
    if pad is not None:
        assert torch.count_nonzero(model.get_input_embeddings().weight[pad]) == 0


def test_initial_weights_depend_only_on_the_seed_and_the_name():
    """Two materialisations with one seed are equal; another seed changes every random tensor; one module's
    values do not depend on which other modules exist (a deeper model shares its first layers' weights)."""
    config = small_config("gated_moe_tiny")
    a, b = (materialize(build_meta_model(config), seed=3) for _ in range(2))
    c = materialize(build_meta_model(config), seed=4)
    fields = yaml.safe_load((MODEL_PRESET_DIR / "gated_moe_tiny.yaml").read_text())
    deeper = build_model_config({**fields, "num_hidden_layers": config.num_hidden_layers + 1})
    d = dict(materialize(build_meta_model(deeper), seed=3).named_parameters())
    for (key, x), y, z in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(x, y), key
        assert torch.equal(x, d[key]), key
        if x.std() > 0:
            assert not torch.equal(x, z), key
    assert module_seed(3, "model.layers.0") != module_seed(3, "model.layers.1") != module_seed(4, "model.layers.1")


def test_resume_materialises_without_drawing_initial_weights():
    """initialize=False gives storage only (a checkpoint overwrites it): nothing random is drawn, so two such
    models need not agree, and the global RNG is untouched either way."""
    model = build_meta_model(small_config("gated_moe_tiny"))
    state = torch.random.get_rng_state()
    materialize(model, seed=0, initialize=False)
    assert is_materialized(model) and torch.equal(state, torch.random.get_rng_state())
    materialize(build_meta_model(small_config("deltaproduct_tiny")), seed=0)
    assert torch.equal(state, torch.random.get_rng_state())


# ---------------------------------------------------------------- the same weights under every topology


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    return write_tiny_corpus_and_tokenizer(tmp_path_factory.mktemp("corpus"))


def initial_weights(corpus, tok, out: Path, preset: str, nproc: int, **fields) -> dict[str, torch.Tensor]:
    """The weights a run starts from: one step at lr 0 (AdamW's decoupled weight decay is scaled by lr too),
    then `seedlm export`, which gathers ZeRO-3 partitions and expert-parallel slices."""
    args = [preset, *tiny_run_overrides(corpus, tok, output_dir=out, max_steps=1, save_interval=1,
                                        **{"train.eval_interval": 0, "train.lr": 0.0, **fields})]
    if nproc == 1:
        assert seedlm(["train", *args]) == 0
    else:
        from seedlm.launch.distributed import free_port

        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
             f"--master_port={free_port()}", "-m", "seedlm.launch.cli", "train", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
    assert seedlm(["export", str(out), str(out / "export")]) == 0
    state = {}
    for file in sorted((out / "export").glob("*.safetensors")):
        state.update(load_file(file))
    return state


@pytest.mark.parametrize("preset, topologies", [
    ("gated_moe_tiny", [(1, {"zero_stage": 0}), (4, {"zero_stage": 3}), (2, {"zero_stage": 2,
                                                                             "expert_parallel_size": 2})]),
    ("deltaproduct_tiny", [(1, {"zero_stage": 0}), (2, {"zero_stage": 3})]),
])
def test_one_seed_gives_the_same_initial_weights_under_every_topology(corpus_and_tokenizer, tmp_path, preset,
                                                                       topologies):
    corpus, tok = corpus_and_tokenizer
    runs = [initial_weights(corpus, tok, tmp_path / f"run{i}", preset, nproc, **fields)
            for i, (nproc, fields) in enumerate(topologies)]
    first = runs[0]
    for (nproc, fields), state in zip(topologies[1:], runs[1:]):
        assert state.keys() == first.keys()
        for key in first:
            assert torch.equal(state[key], first[key]), (nproc, fields, key)


ZERO3_BUILD = """
import json, sys, torch
from seedlm.launch.distributed import init_distributed
from seedlm.launch.engine import deepspeed_config
from seedlm.launch.config import TrainConfig
from seedlm.launch.materialize import build_meta_model, largest_unit_elements, materialize
from seedlm.model import GatedMoeConfig
from benchmarks.bench_startup_memory import peak_rss_kib

dist = init_distributed()
config = GatedMoeConfig(vocab_size=512, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=2,
                        moe_intermediate_size=512)
model = build_meta_model(config)
ds_config = deepspeed_config(TrainConfig(zero_stage=3), 1)
import deepspeed; deepspeed.zero.Init(module=torch.nn.Linear(2, 2), config_dict_or_path=ds_config)  # warm imports
before = peak_rss_kib()
materialize(model, seed=0, zero3_config=ds_config)
held = sum(p.ds_tensor.numel() for p in model.parameters())
row = {"rank": dist.rank, "growth_kib": peak_rss_kib() - before, "held": held,
       "whole": sum(p.ds_numel for p in model.parameters()), "unit": largest_unit_elements(model),
       "gathered": sum(p.numel() for p in model.parameters())}
with open(f"{sys.argv[1]}/rank{dist.rank}.json", "w") as f:  # a file per rank: printed lines can interleave
    f.write(json.dumps(row))
"""


def test_zero3_ranks_hold_their_partition_and_never_the_whole_model(tmp_path):
    """2 ranks, ZeRO-3, a 34M-parameter MoE: after materialize each rank holds half the elements and no
    gathered weight; while materialising, its peak grew by far less than the whole model's 136 MB (its half,
    plus about one decoder layer at a time), where building the model whole costs all of it on every rank."""
    import json

    from seedlm.launch.distributed import free_port

    script = tmp_path / "build.py"
    script.write_text(ZERO3_BUILD)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert len(rows) == 2
    for row in rows:
        whole_bytes = 4 * row["whole"]
        assert row["gathered"] == 0
        assert abs(row["held"] - row["whole"] / 2) <= row["whole"] * 0.01
        assert row["growth_kib"] * 1024 < whole_bytes / 2 + 2 * 4 * row["unit"] < 0.8 * whole_bytes
