"""Expert parallelism (EP=2) on 2 and 4 gloo ranks against one process on the same global batch.

One torchrun launch (this file run as a script) does every distributed case and saves what it got; the
tests compute the single-process references here and compare:
  (a) loss and all gradients (reduced like ZeRO does, experts gathered), under natural routing and under
      routings where rank 1 receives no token for some or all of its experts;
  (b) deepspeed.initialize with ZeRO 1 and ZeRO 2 (and ZeRO 2 with gradient clipping): parameters after
      a few AdamW steps (DeepSpeed's config optimizer or a client torch AdamW) equal plain torch AdamW on
      the whole batch, also after a checkpoint resume;
  (c) ZeRO-3 + EP is refused with a clear message;
  (d) gather_full_state_dict / save_pretrained give the single-process layout.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

EP = 2
WORLDS = (2, 4)  # 4 ranks: expert-data-parallel groups of 2, so expert gradients are really reduced
SEQ = 16
MICRO = 2  # sequences per rank; the global batch is world * MICRO
STEPS = 3
RESUME_AT = 2  # (b) also resumes from a checkpoint written after this many steps
# eps comparable to the gradients (~1e-3) keeps AdamW sensitive to the gradient scale (a wrong expert-gradient
# divisor shows) and insensitive to fp32 reduction-order noise (tight tolerances hold)
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-3, 0.1
CLIP = 0.05  # small enough to be active on every step
# expert_bias that forces every token's top-2 onto these experts (rank 0 owns 0..3, rank 1 owns 4..7)
FORCED_ROUTINGS = {"all_on_rank0": (0, 1), "one_expert_on_rank1": (0, 5)}
# run: (ZeRO stage, gradient clipping, client torch optimizer instead of DeepSpeed's config optimizer)
ZERO_RUNS = {"zero1": (1, 0.0, False), "zero2": (2, 0.0, True), "zero2_clip": (2, CLIP, True)}


def build_model(router_bias_update_rate=0.0):
    from seedlm.launch.presets import load_model_config
    from seedlm.model import GatedMoeForCausalLM

    config = load_model_config("gated_moe_tiny", vocab_size=256, router_bias_update_rate=router_bias_update_rate)
    torch.manual_seed(0)
    return GatedMoeForCausalLM(config).float()


def force_routing(model, experts):
    for block in model.moe_blocks():
        block.gate.expert_bias.zero_()
        block.gate.expert_bias[list(experts)] = 10.0  # probs <= 1, so these two always win top-2


def global_batch(step, world):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 256, (world * MICRO, SEQ), generator=gen)


def adamw_param_groups(model):
    from seedlm.launch.expert_parallel import optimizer_param_groups

    return optimizer_param_groups(model, WD, None)


# ------------------------------------------------------------------------------------------------------
# The distributed side (run by torchrun)


def _gathered_grads(model, info):
    """Gradients reduced as the ZeRO MoE path does (experts: sum over the expert-data-parallel group,
    the rest: sum over all ranks; both divided by the world size), experts gathered to [E, ...]."""
    import torch.distributed as dist

    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        if name in info.expert_param_names:
            dist.all_reduce(grad, group=info.edp_group)
            grad /= dist.get_world_size()
            parts = [torch.empty_like(grad) for _ in range(info.ep_size)]
            dist.all_gather(parts, grad, group=info.ep_group)
            grad = torch.cat(parts)
        else:
            dist.all_reduce(grad)
            grad /= dist.get_world_size()
        grads[name] = grad
    return grads


def _worker(out_dir):
    import deepspeed
    import torch.distributed as dist

    from seedlm.launch.distributed import init_distributed
    from seedlm.launch.expert_parallel import (
        ExpertParallelError,
        apply_expert_parallel,
        check_engine_expert_parallel,
        expert_parallel_engine_context,
        gather_full_state_dict,
        loss_with_global_balancing,
        optimizer_param_groups,
        sync_expert_weights_after_load,
    )

    init_distributed()  # seedlm's start of the group, which exit_process below relies on
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * MICRO, (rank + 1) * MICRO)
    results = {}

    # (a) forward loss and gradients, natural and forced routings
    for case, experts in [("natural", None), *FORCED_ROUTINGS.items()]:
        model = build_model(router_bias_update_rate=0.0 if experts is None else 1.0)
        if experts is not None:
            force_routing(model, experts)
        info = apply_expert_parallel(model, EP)
        ids = global_batch(0, world)[mine]
        out = model(input_ids=ids, labels=ids)
        loss = loss_with_global_balancing(out, model.config)
        loss.backward()
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        results[f"a_{case}"] = {"losses": torch.stack(losses), "grads": _gathered_grads(model, info)}

    # (d) the gathered state dict, and save_pretrained from it
    model = build_model()
    info = apply_expert_parallel(model, EP)
    full = gather_full_state_dict(model, info)
    results["d_full_state_dict"] = full
    results["d_local_shapes"] = {n: tuple(p.shape) for n, p in model.named_parameters() if n in info.expert_param_names}
    if rank == 0:
        # save_pretrained empties the dict it is given, hence the copy
        model.save_pretrained(os.path.join(out_dir, "export"), state_dict=dict(full))
    dist.barrier()

    # (b) DeepSpeed ZeRO 1 / 2 training steps; then a resume from the checkpoint after step RESUME_AT
    def zero_engine(model, stage, clip, client_optimizer):
        info = apply_expert_parallel(model, EP, zero_stage=stage)
        ds_config = {
            "train_batch_size": world * MICRO,
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": clip,
            "zero_optimization": {"stage": stage},
            "steps_per_print": 10**9,
        }
        groups = optimizer_param_groups(model, WD, info)
        if client_optimizer:  # the trainer's way: a torch optimizer built on the param groups
            kwargs = {"optimizer": torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)}
        else:  # DeepSpeed builds it from the config
            adamw = {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD, "torch_adam": True}
            ds_config["optimizer"] = {"type": "AdamW", "params": adamw}
            kwargs = {"model_parameters": groups}
        with expert_parallel_engine_context(info):
            engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, **kwargs)
        check_engine_expert_parallel(engine, info)
        return engine, info

    def train(engine, steps):
        step_losses = []
        for step in steps:
            ids = global_batch(step, world)[mine]
            out = engine(input_ids=ids, labels=ids)
            loss = loss_with_global_balancing(out, engine.module.config)
            engine.backward(loss)
            engine.step()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            step_losses.append(mean_loss.item() / world)
        return step_losses

    for run, (stage, clip, client) in ZERO_RUNS.items():
        engine, info = zero_engine(build_model(), stage, clip, client)
        step_losses = train(engine, range(RESUME_AT))
        engine.save_checkpoint(os.path.join(out_dir, run), tag="resume")
        step_losses += train(engine, range(RESUME_AT, STEPS))
        results[f"b_{run}"] = {"params": gather_full_state_dict(engine.module, info), "losses": step_losses}
        del engine

        perturbed = build_model()
        with torch.no_grad():
            for param in perturbed.parameters():
                param.add_(1.0)
        engine, info = zero_engine(perturbed, stage, clip, client)
        engine.load_checkpoint(os.path.join(out_dir, run), tag="resume")
        sync_expert_weights_after_load(engine, info)
        train(engine, range(RESUME_AT, STEPS))
        results[f"b_{run}_resumed"] = gather_full_state_dict(engine.module, info)
        del engine

    # (c) ZeRO-3 with EP is refused before anything is sharded
    try:
        apply_expert_parallel(build_model(), EP, zero_stage=3)
        results["c_zero3"] = "accepted"
    except ExpertParallelError as error:
        results["c_zero3"] = str(error)

    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    with open(os.path.join(out_dir, f"done{rank}.json"), "w") as f:
        json.dump({"rank": rank}, f)
    dist.barrier()


# ------------------------------------------------------------------------------------------------------
# The tests


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"{w}ranks")
def ep_results(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"ep{world}")
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        __file__, str(out_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return world, out_dir, torch.load(out_dir / "results.pt", weights_only=False)


def _reference_loss_and_grads(experts, world):
    model = build_model(router_bias_update_rate=0.0 if experts is None else 1.0)
    if experts is not None:
        force_routing(model, experts)
    ids = global_batch(0, world)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["natural", *FORCED_ROUTINGS])
def test_ep_loss_and_grads_match_single_process(ep_results, case):
    world, _, results = ep_results
    got = results[f"a_{case}"]
    ref_out, ref_grads = _reference_loss_and_grads(FORCED_ROUTINGS.get(case), world)
    # the data-parallel loss is the mean of the rank losses
    torch.testing.assert_close(got["losses"].mean(), ref_out.loss.detach(), rtol=1e-6, atol=1e-6)
    assert got["grads"].keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert got["grads"][name].shape == ref.shape, name
        torch.testing.assert_close(got["grads"][name], ref, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    if case != "natural":  # the routing really was forced: every assignment went to the two experts
        forced = FORCED_ROUTINGS[case]
        counts = ref_out.expert_counts
        assert counts[:, list(forced)].sum() == counts.sum() == 2 * world * MICRO * SEQ * counts.shape[0]


def _reference_training(clip, world):
    model = build_model()
    optimizer = torch.optim.AdamW(adamw_param_groups(model), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    losses = []
    for step in range(STEPS):
        ids = global_batch(step, world)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return model.state_dict(), losses


@pytest.mark.slow
@pytest.mark.parametrize("run", list(ZERO_RUNS))
def test_zero_ep_training_matches_single_process_adamw(ep_results, run):
    world, _, results = ep_results
    got, got_resumed = results[f"b_{run}"], results[f"b_{run}_resumed"]
    ref_state, ref_losses = _reference_training(ZERO_RUNS[run][1], world)
    initial = build_model().state_dict()
    assert got["params"].keys() == ref_state.keys()
    for name, ref in ref_state.items():
        assert not torch.equal(ref, initial[name]) or "expert_bias" in name, f"{name} did not train"
        torch.testing.assert_close(got["params"][name], ref, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # resuming from the checkpoint of step RESUME_AT reaches the same parameters
    for name, ref in ref_state.items():
        torch.testing.assert_close(
            got_resumed[name], ref, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"resumed {n}: {m}"
        )
    # the mean of the rank losses (each with the global balancing term) is the single-process loss, each step
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_zero3_with_ep_is_refused(ep_results):
    _, _, results = ep_results
    message = results["c_zero3"]
    assert "ZeRO stage 3" in message and "zero_stage 1 or 2" in message


def test_validation_messages():
    from seedlm.launch.expert_parallel import ExpertParallelError, validate_expert_parallel

    validate_expert_parallel(1, 3, 0, zero_stage=3)  # EP off: anything goes
    validate_expert_parallel(2, 4, 8, zero_stage=2)
    for args, words in [
        ((2, 3, 8, 2), "divide the number of ranks"),
        ((3, 3, 8, 2), "divide num_experts"),
        ((2, 2, 0, 2), "num_experts is 0"),
        ((2, 2, 8, 3), "ZeRO stage 3"),
    ]:
        with pytest.raises(ExpertParallelError, match=words):
            validate_expert_parallel(*args[:3], zero_stage=args[3])


@pytest.mark.slow
def test_gather_full_state_dict_is_single_process_layout(ep_results):
    _, out_dir, results = ep_results
    ref = build_model().state_dict()
    full = results["d_full_state_dict"]
    assert full.keys() == ref.keys()
    for name, tensor in ref.items():
        assert torch.equal(full[name], tensor), name
    # the swapped modules really held half the experts
    local = results["d_local_shapes"]
    assert local and all(shape[0] == 8 // EP for shape in local.values())

    from seedlm.model import GatedMoeForCausalLM

    loaded = GatedMoeForCausalLM.from_pretrained(out_dir / "export").state_dict()
    for name, tensor in ref.items():
        assert torch.equal(loaded[name], tensor), name


def test_optimizer_param_groups_split():
    from seedlm.launch.expert_parallel import optimizer_param_groups

    model = build_model()
    groups = optimizer_param_groups(model, WD, None)
    by_name = {g["name"]: g for g in groups}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in by_name["no_decay"]["params"]}
    decay = {names[id(p)] for p in by_name["decay"]["params"]}
    assert "model.embed_tokens.weight" in no_decay and "model.norm.weight" in no_decay
    assert "model.layers.0.mlp.experts.gate_up_proj" in decay and "model.layers.0.mlp.gate.weight" in decay
    assert all(p.ndim >= 2 for p in by_name["decay"]["params"])
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


if __name__ == "__main__":  # torchrun tests/test_expert_parallel.py OUT_DIR
    from seedlm.launch.distributed import exit_process

    _worker(sys.argv[1])
    exit_process(0)  # not the interpreter's teardown, where DeepSpeed's gloo groups can abort the rank
