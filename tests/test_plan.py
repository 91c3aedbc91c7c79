"""`seedlm plan`: parameters counted on the meta device, model states against DeepSpeed's own estimators, the
activation model against bytes measured for backward (both families, each checkpointing mode), the table and
JSON, every mistake refused with what to do, and the plan against the peak memory of real 2-rank runs."""

import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks.bench_host_allocator import two_rank_train_peak_rss
from seedlm.launch.cli import main as seedlm
from seedlm.launch.config import TrainConfig, load_run_config, model_config_from_run
from seedlm.launch.engine import apply_activation_checkpointing
from seedlm.launch.metrics import saved_bytes_for_backward
from seedlm.launch.plan import (
    activation_bytes_per_token,
    build_plan,
    count_parameters,
    model_state_bytes,
    parse_memory,
)
from seedlm.model import DeltaProductConfig, DeltaProductForCausalLM, GatedMoeConfig, GatedMoeForCausalLM
from tests.helpers import tiny_run_overrides, write_tiny_corpus_and_tokenizer

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    "moe": GatedMoeConfig(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=48, shared_expert_intermediate_size=40, max_position_embeddings=512),
    "moe_headwise": GatedMoeConfig(vocab_size=128, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                                   num_key_value_heads=3, head_dim=24, num_experts=8, num_experts_per_tok=3,
                                   moe_intermediate_size=32, attn_output_gate="headwise",
                                   max_position_embeddings=512),
    "dense": GatedMoeConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=32, num_experts=0, intermediate_size=160,
                            max_position_embeddings=512),
    "deltaproduct_hybrid": DeltaProductConfig(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_heads=2,
                                              head_dim=32, num_householder=2, intermediate_size=96, attn_layers=[1],
                                              attn_num_heads=2),
    "deltaproduct_nh3": DeltaProductConfig(vocab_size=128, hidden_size=96, num_hidden_layers=2, num_heads=3,
                                           head_dim=16, expand_v=2.0, num_householder=3, intermediate_size=128),
    "deltaproduct_moe": DeltaProductConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_heads=2,
                                           head_dim=32, num_householder=1, use_forget_gate=False, num_experts=4,
                                           num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=32, attn_layers=[3], attn_num_heads=4,
                                           attn_num_kv_heads=2),
}


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_activation_model_is_within_15_percent_of_the_measured_bytes(shape, mode):
    config = SHAPES[shape]
    torch.manual_seed(0)
    cls = DeltaProductForCausalLM if config.model_type == "seedlm_deltaproduct" else GatedMoeForCausalLM
    model = cls(config).train()
    apply_activation_checkpointing(model, TrainConfig(activation_checkpointing=mode))
    for batch, seq_len in ((1, 192), (2, 64)):
        ids = torch.randint(0, 128, (batch, seq_len), generator=torch.Generator().manual_seed(0))
        measured = saved_bytes_for_backward(lambda ids=ids: model(ids, labels=ids).loss, model.parameters())
        acts = activation_bytes_per_token(config, mode, 2, a=4, batch=batch)
        predicted = batch * seq_len * acts["saved"] + acts["fixed"]
        assert abs(predicted / measured - 1) < 0.15, (shape, mode, batch, predicted, measured)


@pytest.mark.parametrize("shape", ["moe", "dense", "deltaproduct_moe"])
def test_parameters_are_counted_on_the_meta_device_like_the_real_model(shape):
    config = SHAPES[shape]
    model = (DeltaProductForCausalLM if config.model_type == "seedlm_deltaproduct" else GatedMoeForCausalLM)(config)
    count = count_parameters(config)
    assert count.total == sum(p.numel() for p in model.parameters()) == config.parameter_counts().total
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert count.expert == experts == config.parameter_counts().expert
    # the module ZeRO-3 gathers at once: here the experts of a layer or an FFN projection, usually the embedding
    assert count.largest_module == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def test_model_states_match_deepspeeds_estimators_plus_the_reduce_bucket():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    count = count_parameters(SHAPES["moe"])
    world, bucket = 8, count.total  # fewer parameters than DeepSpeed's 5e8-element bucket: the bucket is all
    _, zero2 = estimate_zero2_model_states_mem_needs(count.total, world, 1, cpu_offload=False)
    ours = model_state_bytes(count, world, 2, 1, bf16=True)
    # DeepSpeed's estimate is the step's: bf16 gradient partition and its fp32 copy (6 bytes / ranks); ours is the
    # end of backward, larger: the bf16 bucket and the flattened copy allreduce_bucket makes of it
    assert ours["gradients"] == 2 * bucket + 2 * bucket > 6 * count.total / world
    assert sum(ours.values()) - ours["gradients"] + 6 * count.total / world == pytest.approx(zero2, rel=1e-6)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(count.total, count.largest_module, world, 1,
                                                        cpu_offload=False, cpu_offload_params=False)
    ours = sum(model_state_bytes(count, world, 3, 1, bf16=True).values())
    # DeepSpeed's ZeRO-3 estimate leaves out the bf16 gradient partition (2 bytes / ranks), which stage3.py holds
    # (its contiguous gradient partitions) beside the fp32 copy the step makes, and the reduce bucket, which
    # launch/engine.py sizes to the largest decoder layer
    assert 0 < count.largest_unit < count.total
    assert ours - 2 * count.largest_unit - 2 * count.total / world == pytest.approx(zero3, rel=1e-6)
    # expert parallelism divides the unsharded expert weights by EP; sharded states stay 1 / world
    ep = model_state_bytes(count, world, 1, 4, bf16=False)
    assert ep["parameters"] == 4 * (count.non_expert + count.expert / 4)
    assert ep["optimizer"] == 12 * count.total / world


def plan_cli(capsys, *args) -> tuple[int, str, str]:
    code = seedlm(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_table_shows_every_zero_stage_and_expert_parallel_size(capsys):
    code, out, err = plan_cli(capsys, "gated_moe_tiny", "--nodes", "1", "--gpus-per-node", "4", "--gpu-memory", "1GiB")
    assert code == 0, err
    rows = [line.split()[-9:] for line in out.splitlines() if re.match(r"^(>>|\*)?\s+\d\s+\d+\s", line)]
    assert [tuple(r[:2]) for r in rows] == [(str(z), str(ep)) for z in range(4) for ep in (1, 2, 4)][:-2]
    assert rows[-1][-1] in ("yes", "no") and float(rows[-1][-2]) > 0
    assert [line.split()[:3] for line in out.splitlines() if "not supported" in line] == [["3", "2-4", "-"]]
    assert sum(line.startswith(">>") for line in out.splitlines()) == 1
    assert "GFLOPs per token" in out and "checkpoint on disk" in out


def test_json_holds_the_same_plan(capsys):
    code, out, _ = plan_cli(capsys, "gated_moe_tiny", "--gpus-per-node", "2", "--json", "train.dtype=bf16")
    plan = json.loads(out)
    assert code == 0 and plan["world_size"] == 2 and plan["dtype"] == "bf16"
    assert [(r["zero_stage"], r["expert_parallel_size"]) for r in plan["rows"]] == [
        (z, ep) for z in range(4) for ep in (1, 2)]
    row = plan["rows"][0]
    assert row["bytes"]["total"] == sum(v for k, v in row["bytes"].items() if k != "total")
    assert sum(r["best"] for r in plan["rows"]) == 1
    model_config = model_config_from_run(load_run_config("gated_moe_tiny"))
    assert plan["parameters"]["total"] == model_config.parameter_counts().total


def test_a_hybrid_deltaproduct_moe_plans_each_expert_parallel_size_its_experts_allow(capsys):
    code, out, _ = plan_cli(capsys, "deltaproduct_tiny", "--gpus-per-node", "6", "--json",
                            "model=deltaproduct_hybrid_moe", "seq_len=2048", "train.dtype=bf16")
    plan = json.loads(out)
    assert code == 0 and plan["parameters"]["expert"] > 0
    assert sorted({r["expert_parallel_size"] for r in plan["rows"]}) == [1, 2]  # divide 6 ranks and 32 experts
    model_config = model_config_from_run(load_run_config("deltaproduct_tiny", ["model=deltaproduct_hybrid_moe"]))
    assert plan["flops_per_token"] == model_config.flops_per_token(2048)


def test_an_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit) as err:
        seedlm(["plan", "gated_moe_tiny", "--gpus-per-node", "2", "--nodez", "2"])
    assert err.value.code == 2 and "unrecognized arguments: --nodez 2" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [("80GiB", 80 * 2**30), ("80GB", 80 * 10**9), ("141 GiB", 141 * 2**30),
                                            ("512MiB", 512 * 2**20), ("1.5TB", 1.5e12)])
def test_memory_sizes_are_parsed_with_their_unit(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("args, message", [
    (["--gpu-memory", "80"], "--gpu-memory '80' is not a memory size: give a positive number and a unit"),
    (["--gpu-memory", "80 gigs"], "--gpu-memory '80 gigs' is not a memory size"),
    (["--gpu-memory", "0GB"], "--gpu-memory '0GB' is not a memory size"),
    (["--nodes", "0"], "--nodes 0 --gpus-per-node 8: both must be >= 1"),
    (["--gpus-per-node", "-1"], "--nodes 1 --gpus-per-node -1: both must be >= 1"),
    (["--mfu", "40"], "--mfu 40.0: give the fraction of peak the run reaches, in (0, 1]"),
    (["--gpus-per-node", "6", "expert_parallel_size=4", "zero_stage=2"],
     "expert_parallel_size=4 must divide the number of ranks (6); use a divisor of 6 (world size 6 = 1 nodes x 6 "
     "GPUs); on this cluster expert_parallel_size can be [1, 2]"),
    (["train.lrr=1"], "unknown key train.lrr; did you mean 'lr'?"),
    (["model_overrides.num_expert=4"], "unknown field 'num_expert' for seedlm_gated_moe; did you mean 'num_experts'?"),
])
def test_mistakes_are_refused_with_what_to_do(capsys, args, message):
    code, out, err = plan_cli(capsys, "gated_moe_tiny", *args)
    assert code == 2 and out == ""
    assert err.startswith("seedlm plan: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_plan_that_cannot_fit_names_the_term_and_what_to_change(capsys):
    # model states too large: 15.8B parameters on 4 GPUs of 80GB
    code, out, _ = plan_cli(capsys, "gated_moe_15a2b_64gpu", "--nodes", "1", "--gpus-per-node", "4",
                            "--gpu-memory", "80GB", "micro_batch_size=1", "train.activation_checkpointing=full",
                            "expert_parallel_size=1")
    assert code == 1
    assert "nothing fits in 67.1 GiB per GPU" in out and "its largest term is" in out
    assert "- more ranks:" in out and "GPUs would hold them" in out
    # activations too large: a tiny model, a huge micro-batch
    code, out, _ = plan_cli(capsys, "gated_moe_tiny", "--gpus-per-node", "1", "--gpu-memory", "1GiB",
                            "micro_batch_size=256", "seq_len=1024")
    assert code == 1 and "its largest term is activations" in out
    assert "train.activation_checkpointing=full" in out and re.search(r"micro_batch_size=\d+ fits", out)
    fitting = int(re.search(r"micro_batch_size=(\d+) fits", out).group(1))
    code, _, _ = plan_cli(capsys, "gated_moe_tiny", "--gpus-per-node", "1", "--gpu-memory", "1GiB",
                          f"micro_batch_size={fitting}", "seq_len=1024")
    assert code == 0  # the advice fits


def test_the_64_gpu_preset_fits_as_the_readme_says(capsys):
    code, out, _ = plan_cli(capsys, "gated_moe_15a2b_64gpu", "--nodes", "8", "--gpus-per-node", "8",
                            "--gpu-memory", "80GiB")
    assert code == 0
    configured = [line for line in out.splitlines() if line.startswith(" *") or line.startswith(">>")]
    assert configured and all(line.rstrip().endswith("yes") for line in configured)


# ---- the plan against measured 2-rank runs ----

# glibc keeps the blocks a step frees in its heap, resident (its self-raising mmap threshold): +300 MiB per rank at
# ZeRO 3 here, the allocator's memory and not the tensors' (as the CUDA caching allocator's reserved memory is not
# in any plan). With the threshold fixed, freed blocks of 1 MiB and more go back to the OS and the peak RSS
# measures what the plan models (launch/host_memory.py).
FIXED_MMAP_THRESHOLD = 1 << 20


def peak_rss_per_rank(args: list[str], cwd: Path) -> list[int]:
    """Max RSS (bytes) of each of 2 gloo ranks of `seedlm train`, each rank under /usr/bin/time. The run's own
    setting (train.host_mmap_threshold) is what counts, not the caller's MALLOC_* variables."""
    peaks = two_rank_train_peak_rss(args, cwd, timeout=600)
    assert len(peaks) == 2, peaks
    return peaks


BIG_MODEL = {"model_overrides.hidden_size": 512, "model_overrides.num_hidden_layers": 4,
             "model_overrides.num_attention_heads": 8, "model_overrides.head_dim": 64,
             "model_overrides.moe_intermediate_size": 512, "model_overrides.shared_expert_intermediate_size": 512}


def planned_and_peak(tmp_path, name: str, zero_stage: int, ep: int, fields: dict) -> tuple[float, list[int]]:
    """The plan's per-rank bytes of one 2-rank run (fp32, 2 steps) and each rank's measured peak RSS. The save at
    the end is synchronous: a background save first copies the states to host memory, which on a GPU is not GPU
    memory and which the plan leaves out."""
    corpus, tok = write_tiny_corpus_and_tokenizer(tmp_path)
    common = {"train.max_steps": 2, "train.save_interval": 100, "train.eval_interval": 0, "train.async_save": "false",
              "train.host_mmap_threshold": FIXED_MMAP_THRESHOLD,
              "zero_stage": zero_stage, "expert_parallel_size": ep}
    overrides = tiny_run_overrides(corpus, tok, output_dir=tmp_path / name, **common, **fields)
    plan = build_plan(load_run_config("gated_moe_tiny", overrides), nodes=1, gpus_per_node=2)
    row = next(r for r in plan.rows if (r.zero_stage, r.expert_parallel_size) == (zero_stage, ep))
    return row.bytes["total"], peak_rss_per_rank(["gated_moe_tiny", *overrides], REPO)


def planned_and_measured(tmp_path, zero_stage: int, ep: int, baseline=None) -> tuple[float, list[int]]:
    """The plan's per-rank bytes (model states, activations, loss) of a 34M-parameter gated MoE minus those of a
    ~1M-parameter baseline, and each rank's peak RSS of the two runs' difference (2 gloo ranks, fp32, 2 steps).
    baseline: planned_and_peak of the tiny model, when already measured (it is run at ZeRO-2, EP 1 otherwise)."""
    baseline = baseline or planned_and_peak(tmp_path, "baseline", 2, 1, {})
    planned, peaks = planned_and_peak(tmp_path, f"big_zero{zero_stage}_ep{ep}", zero_stage, ep, BIG_MODEL)
    return planned - baseline[0], [big - base for big, base in zip(peaks, baseline[1])]


@pytest.fixture(scope="module")
def tiny_baseline(tmp_path_factory):
    """The ~1M-parameter run every measurement subtracts (ZeRO-2, EP 1): the interpreter, torch, DeepSpeed, the
    data pipeline and a tiny model. Its peak differs between ZeRO stages by a few MiB, so one run serves all."""
    return planned_and_peak(tmp_path_factory.mktemp("plan_baseline"), "baseline", 2, 1, {})


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, ep", [(2, 1), (3, 1), (2, 2), (1, 2)])
def test_plan_matches_the_peak_memory_of_two_rank_runs(tmp_path, tiny_baseline, zero_stage, ep):
    """Per rank, above the tiny baseline (fp32, 2 gloo ranks; 32.3M parameters, 25.2M of them in 8 experts;
    shard = parameters / 2 ranks; full = non-expert + experts / EP; 4 bytes each), the plan's terms:

    - ZeRO-2: weights 4 x full; gradients at the end of backward: the reduce bucket (4 x full) and the copy
      DeepSpeed flattens of one process group's part of it (without EP: all of it), then the gradient partition
      (4 x shard); optimizer 12 x shard (fp32 master and two moments);
    - ZeRO-2 EP 2: the same with half the experts in full; the non-expert and the expert gradients are reduced
      one group after the other, so the flattened copy is the larger group's;
    - ZeRO-1 EP 2: whole gradients 4 x full and the step's fp32 copy of the partition 4 x shard, no bucket;
    - ZeRO-3: weights 4 x (shard + the largest module, gathered), gradients 4 x (shard + gathered module + a
      bucket of one decoder layer + the step's fp32 copy), optimizer 12 x shard;
    - all: activations and one loss chunk of the 2 x 64-token micro-batch.

    Measured with AdamW fused (its default implementation allocated two more fp32 partitions at each step) and
    train.host_mmap_threshold=1 MiB (FIXED_MMAP_THRESHOLD; with glibc's self-raising threshold ZeRO-3 measured
    843 / 863 MiB against a plan of 550); the run's background save is off (see planned_and_peak)."""
    predicted, grown = planned_and_measured(tmp_path, zero_stage, ep, baseline=tiny_baseline)
    for rank in range(2):
        print(f"ZeRO-{zero_stage} EP {ep} rank {rank}: plan {predicted / 2**20:.0f} MiB, measured "
              f"{grown[rank] / 2**20:.0f} MiB, ratio {predicted / grown[rank]:.3f}")
    for rank in range(2):
        assert abs(predicted / grown[rank] - 1) < 0.15, (zero_stage, ep, rank, predicted, grown)
