"""Memory, checkpoint size, FLOPs and step time of a run config on a cluster, before anything is allocated:
the estimator behind `seedlm plan` (launch/commands/plan.py prints it).

Parameters are counted from the model built on the meta device (no weights), expert weights
(`mlp.experts.gate_up_proj` / `down_proj`) apart from the rest, tied embeddings once. Per GPU, for each ZeRO stage
and expert-parallel (EP) size:

Model states, as DeepSpeed 0.19.8 holds them with our torch AdamW (w = 2 bytes in bf16 training, 4 in fp32).
"full" is what one rank holds unsharded: the non-expert parameters plus 1/EP of the experts; "shard" is that
spread over the data-parallel ranks: non-expert / world + experts / world (an expert slice is sharded over its
world / EP expert-data-parallel ranks).

    stage  parameters          gradients                              optimizer states
    0      w * full            w * full (+ 4 * full in bf16)           8 * full (+ 4 * full fp32 master in bf16)
    1      w * full            w * full + 4 * shard                    12 * shard
    2      w * full            max(w * (bucket + max(group, shard)),   12 * shard
                               w * shard + 4 * shard)  (group + shard when the bucket fills more than once)
    3      w * (shard + L)     w * (shard + L + unit) + 4 * shard      12 * shard

  - optimizer states: AdamW's two fp32 moments (8 bytes) and an fp32 master copy (4 bytes): ZeRO 1-3 keep that
    copy of their partition in fp32 training too (`single_partition_of_fp32_groups` in stage_1_and_2.py and
    `fp32_partitioned_groups_flat` in stage3.py are clones); without ZeRO, fp32 training updates the weights
    themselves, and bf16 training goes through DeepSpeed's fp16/bf16 optimizer wrapper (fp32 master and fp32
    gradients of every parameter, as `estimate_zero2_model_states_mem_needs` counts for ZeRO-0 data parallel).
  - 4 * shard: the step flattens each rank's gradient partition into one new fp32 tensor for the master weights
    (`flat_grad_partition.to(...)` in stage_1_and_2.py, `self.flatten(...).to(...)` in stage3.py), in fp32 training
    too: the "4_grads_32bit" of DeepSpeed's estimators.
  - ZeRO-2 holds its gradients in two phases, measured on 2 ranks (tests/test_plan.py): at the end of backward
    the reduce bucket, with first the copy `allreduce_bucket` flattens of one process group's gradients
    (group: the whole bucket without EP; with EP the non-expert or the expert gradients, reduced one group after
    the other) and then the rank's gradient partition; the bucket is released before the step, which holds the
    partition and its fp32 copy. Activations are freed by then, but the total adds them anyway (a bound).
  - bucket: ZeRO-2 reduces gradients through a contiguous bucket of reduce_bucket_size elements
    (DeepSpeed's default 5e8, or fewer when the rank has fewer parameters); unit: ZeRO-3's bucket, which
    launch/engine.py deepspeed_config sizes to the largest decoder layer (materialize.py largest_unit_elements).
  - L: ZeRO-3 gathers one module's parameters (and in backward their gradients) at a time; the largest module,
    usually the embedding, as `estimate_zero3_model_states_mem_needs` counts it (4 * L in bf16).
  - AdamW runs fused (launch/engine.py): its step allocates nothing beyond the two moments, which torch creates
    at the first step.

tests/test_plan.py checks the sum against the peak resident memory of 2-rank CPU runs for ZeRO-2, ZeRO-3, ZeRO-2
EP 2 and ZeRO-1 EP 2.

Activations (bytes per token kept for backward) come from an analytic model of each decoder layer, written in
the tensors the layers save (norm inputs and outputs, projections, rotary q/k, attention output and log-sum-exp,
the sigmoid gate, router logits and indices, the routed tokens' expert activations, the DeltaProduct layer's
projections, betas and gates; tests/test_plan.py checks it against `saved_bytes_for_backward` on real models).
A checkpointed layer keeps only its input; in backward one layer at a time recomputes its forward, so the peak
adds one layer's activations. The loss (model/fused_loss.py) forms its gradients in the forward, chunk by chunk
over the tokens: it keeps the gradient of its input (in the place of the input it kept before) and the weight's
gradient ([vocab, hidden], whatever the token count), and the chunk's fp32 logits and softmax come and go while
every activation is alive.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch

DEFAULT_GPU_FLOPS = 989e12  # H100 / H200 SXM dense bf16 peak (no sparsity), FLOP/s
DEFAULT_MFU = 0.4
MEMORY_MARGIN = 0.10  # of each GPU's memory left free: CUDA context, allocator fragmentation, NCCL buffers
REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size
INDEX_BYTES = 8  # int64 token ids, targets, expert indices
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class PlanError(ValueError):
    """A plan request that cannot be answered (a bad size, a cluster of no GPUs); the message says what to do."""


def parse_memory(text: str) -> int:
    """'80GiB', '80GB', '141 GiB', '512MiB' -> bytes. A bare number is refused: GB and GiB differ by 7%."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if unit not in UNITS or float(match.group(1)) <= 0:
        raise PlanError(f"--gpu-memory {text!r} is not a memory size: give a positive number and a unit, "
                        "e.g. 80GiB, 80GB or 141GiB (units: KB MB GB TB, KiB MiB GiB TiB)")
    return int(float(match.group(1)) * UNITS[unit])


def gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def count_text(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


@dataclass
class ParameterCount:
    """Parameters of the causal LM (tied weights once), the routed experts' share, the largest module (what
    ZeRO-3 gathers at once) and the largest unit (a decoder layer: ZeRO-3's bucket, launch/engine.py)."""

    total: int
    expert: int
    largest_module: int
    num_experts: int
    largest_unit: int = 0

    @property
    def non_expert(self) -> int:
        return self.total - self.expert


def is_expert_parameter(name: str) -> bool:
    from seedlm.launch.expert_parallel import EXPERT_PARAM_NAMES

    *path, leaf = name.split(".")
    return path[-2:] == ["mlp", "experts"] and leaf in EXPERT_PARAM_NAMES


def count_parameters(model_config) -> ParameterCount:
    """Count from the model built on the meta device: shapes only, no memory, seconds for 15B parameters."""
    from transformers import AutoModelForCausalLM

    from seedlm.launch.materialize import largest_unit_elements

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    named = dict(model.named_parameters())  # a tied weight is listed once
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    return ParameterCount(total=sum(p.numel() for p in named.values()),
                          expert=sum(p.numel() for n, p in named.items() if is_expert_parameter(n)),
                          largest_module=largest, num_experts=getattr(model_config, "num_experts", 0),
                          largest_unit=largest_unit_elements(model))


def model_state_bytes(count: ParameterCount, world: int, zero_stage: int, ep: int, bf16: bool) -> dict:
    """Per-rank parameters, gradients and optimizer states in bytes (the table in the module docstring)."""
    w = 2 if bf16 else 4
    full = count.non_expert + count.expert / ep
    shard = count.total / world
    bucket = min(REDUCE_BUCKET_ELEMENTS, full)
    if world == 1 and zero_stage in (1, 2):  # such a run takes the ZeRO-0 path (launch/engine.py)
        zero_stage = 0
    if zero_stage == 0:
        return {"parameters": w * full, "gradients": (w + 4 * bf16) * full, "optimizer": (8 + 4 * bf16) * full}
    fp32_step_copy = 4 * shard  # the step flattens the gradient partition into one fp32 tensor
    if zero_stage == 1:
        gradients = w * full + fp32_step_copy
    elif zero_stage == 2:
        group = min(bucket, max(count.non_expert, count.expert / ep)) if ep > 1 else bucket
        # a bucket that fills more than once: the partition, allocated at the first flush, meets a later copy
        copy_and_partition = group + shard if full > bucket else max(group, shard)
        gradients = max(w * (bucket + copy_and_partition), w * shard + fp32_step_copy)
    if zero_stage == 3:  # the gathered module's gradient, and a bucket of one decoder layer (deepspeed_config)
        gradients = w * (shard + count.largest_module + count.largest_unit) + fp32_step_copy
        return {"parameters": w * (shard + count.largest_module), "gradients": gradients, "optimizer": 12 * shard}
    return {"parameters": w * full, "gradients": gradients, "optimizer": 12 * shard}


# ---- activations: bytes per token each decoder layer keeps for backward ----

def norm_elements(hidden: int) -> int:
    """An RMSNorm before a projection: its input, 1/rms, the normed values and the weighted output."""
    return 3 * hidden + 1


def attention_elements(config, heads: int, kv_heads: int, batch: int) -> float:
    """Gated attention (model/layers.py): q_proj's query and gate, q/k norms, rotary q/k (cos, sin shared by the
    batch), v, the attention output and its log-sum-exp, the sigmoid gate and o_proj's input."""
    from seedlm.model.configuration_gated_moe import gate_dim

    head_dim, qk_norm = config.head_dim, bool(config.qk_norm)
    gate = gate_dim(config.attn_output_gate, head_dim)
    query = heads * (head_dim + gate) + heads * head_dim * (3 + qk_norm) + heads * gate + heads * (1 + qk_norm)
    key_value = kv_heads * head_dim * (3 + qk_norm) + kv_heads * qk_norm
    return query + key_value + 2 * head_dim / batch


def deltaproduct_elements(config) -> float:
    """A DeltaProduct mixer (model/deltaproduct_layer.py): q, the n_h keys and values, betas (logits and
    sigmoid), the forget gate, the kernel's q and output, the output gate and o_proj's input. Convolutions,
    norms and the kernel's intra-chunk values are recomputed in backward."""
    heads, k, v, n = config.num_heads, config.head_dim, config.head_v_dim, config.num_householder
    forget = 3 * heads if config.use_forget_gate else 0
    return 2 * heads * k + n * heads * (k + v) + 2 * n * heads + forget + 2 * heads * v + config.hidden_size


def ffn_bytes(config, a: int) -> float:
    """The FFN after the second norm: a dense SwiGLU, or the router, the k routed copies of each token through
    its experts (dropless: exactly k per token) and the optional shared expert."""
    hidden = config.hidden_size
    if not getattr(config, "num_experts", 0):
        return a * 4 * config.intermediate_size
    k, inter, shared = config.num_experts_per_tok, config.moe_intermediate_size, config.shared_expert_intermediate_size
    router = 2 * config.num_experts + k + 2
    routed = k * (3 * hidden + 4 * inter + 1)
    shared_elements = 4 * shared + 1 + hidden if shared else 0
    return a * (router + routed + shared_elements) + 3 * k * INDEX_BYTES


def layer_bytes(config, layer: int, a: int, batch: int) -> float:
    """Bytes per token one decoder layer keeps for backward without checkpointing (a: bytes per float)."""
    if config.model_type == "seedlm_deltaproduct":
        if layer in set(config.attn_layers):
            mixer = attention_elements(config, config.attn_num_heads, config.attn_num_kv_heads, batch)
        else:
            mixer = deltaproduct_elements(config)
    else:
        mixer = attention_elements(config, config.num_attention_heads, config.num_key_value_heads, batch)
    return a * (2 * norm_elements(config.hidden_size) + mixer) + ffn_bytes(config, a)


def checkpointed_layers(num_layers: int, mode: str, every: int) -> set[int]:
    """The decoder layers train.activation_checkpointing recomputes (engine.py apply_activation_checkpointing)."""
    if mode == "none":
        return set()
    return set(range(0, num_layers, every if mode == "selective" else 1))


def activation_bytes_per_token(config, mode: str = "none", every: int = 2, a: int = 4, batch: int = 1) -> dict:
    """Bytes per token kept for backward by the whole causal LM ('saved'), the extra peak in backward while one
    checkpointed layer recomputes its forward ('recompute'), and the bytes kept whatever the token count
    ('fixed': the LM head weight's gradient, which the loss forms in its forward)."""
    hidden = config.hidden_size
    recomputed = checkpointed_layers(config.num_hidden_layers, mode, every)
    per_layer = [layer_bytes(config, i, a, batch) for i in range(config.num_hidden_layers)]
    layers = sum(a * hidden if i in recomputed else per_layer[i] for i in range(config.num_hidden_layers))
    # token ids; the final norm (the loss keeps the gradient of its weighted output, the same bytes)
    ends = INDEX_BYTES + a * norm_elements(hidden)
    recompute = max((per_layer[i] for i in recomputed), default=0)
    return {"saved": layers + ends, "recompute": recompute, "fixed": a * config.vocab_size * hidden}


def loss_peak_bytes(config, tokens: int) -> float:
    """model/fused_loss.py in its forward: one chunk's fp32 logits, softmax and gradient (at most 3 x 4 bytes x
    vocab per token; fp32 overwrites one buffer in place)."""
    from seedlm.model.fused_loss import default_chunk_size

    chunk = min(tokens, default_chunk_size(tokens, config.vocab_size, config.hidden_size))
    return 3 * 4 * chunk * config.vocab_size


def checkpoint_bytes(count: ParameterCount, zero_stage: int, bf16: bool) -> dict:
    """On disk, per checkpoint, all ranks together: DeepSpeed's model-states file (the weights in the training
    dtype; a ZeRO-3 checkpoint writes them as partitions instead), its optimizer files (fp32 master and two
    moments; without ZeRO in fp32, the two moments), and the consolidated hf/ folder (training dtype)."""
    w = 2 if bf16 else 4
    optimizer = 8 * count.total if zero_stage == 0 and not bf16 else 12 * count.total
    return {"model": w * count.total, "optimizer": optimizer, "hf": w * count.total,
            "total": 2 * w * count.total + optimizer}


# ---- the plan ----

@dataclass
class PlanRow:
    zero_stage: int
    expert_parallel_size: int
    supported: bool
    note: str = ""
    bytes: dict = field(default_factory=dict)  # parameters, gradients, optimizer, activations, loss, total
    fits: bool = False
    best: bool = False
    configured: bool = False  # the zero_stage and expert_parallel_size the run config names


@dataclass
class Plan:
    model: str
    world_size: int
    nodes: int
    gpus_per_node: int
    gpu_memory: int
    usable_memory: int
    dtype: str
    micro_batch_size: int
    seq_len: int
    grad_accum_steps: int
    activation_checkpointing: str
    parameters: dict
    flops_per_token: float
    tokens_per_step: int
    step_seconds: float
    mfu: float
    gpu_flops: float
    checkpoint: dict
    rows: list[PlanRow]
    advice: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def valid_expert_parallel_sizes(world: int, num_experts: int) -> list[int]:
    """EP sizes that divide both the ranks and the experts (validate_expert_parallel); a dense model has only 1."""
    return [1] + [ep for ep in range(2, world + 1) if num_experts and world % ep == 0 and num_experts % ep == 0]


def batch_shape(data: dict) -> tuple[int, int]:
    """(micro_batch_size, seq_len) as the trainer reads them: data_pipeline's defaults, or a synthetic task's
    train_length."""
    from seedlm.data_pipeline import DataConfig
    from seedlm.data_pipeline.synthetic import synthetic_data_config
    from seedlm.launch.training_data import synthetic_config

    task = synthetic_config(data)
    config = synthetic_data_config(data, task) if task is not None else DataConfig.from_dict(data)
    return config.micro_batch_size, config.seq_len


def build_plan(run, nodes: int = 1, gpus_per_node: int = 1, gpu_memory: int | str = "80GiB",
               mfu: float = DEFAULT_MFU, gpu_flops: float = DEFAULT_GPU_FLOPS) -> Plan:
    """The plan of a loaded RunConfig (launch/config.py load_run_config) on nodes x gpus_per_node GPUs."""
    from seedlm.launch.config import model_config_from_run
    from seedlm.launch.expert_parallel import ExpertParallelError, validate_expert_parallel

    if nodes < 1 or gpus_per_node < 1:
        raise PlanError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: both must be >= 1")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu {mfu}: give the fraction of peak the run reaches, in (0, 1], e.g. 0.4")
    if gpu_flops <= 0:
        raise PlanError(f"--gpu-flops {gpu_flops}: give the GPU's peak FLOP/s, e.g. 989e12")
    memory = parse_memory(gpu_memory) if isinstance(gpu_memory, str) else int(gpu_memory)
    world = nodes * gpus_per_node
    model_config = model_config_from_run(run)
    t, data = run.train, run.data
    micro_batch, seq_len = batch_shape(data)
    count = count_parameters(model_config)
    try:  # the configured EP size must run on this cluster (any ZeRO stage: the table shows each)
        validate_expert_parallel(t.expert_parallel_size, world, count.num_experts)
    except ExpertParallelError as err:
        sizes = valid_expert_parallel_sizes(world, count.num_experts)
        raise PlanError(f"{err} (world size {world} = {nodes} nodes x {gpus_per_node} GPUs); on this cluster "
                        f"expert_parallel_size can be {sizes}: pass expert_parallel_size=N, or change "
                        "--nodes / --gpus-per-node") from None

    bf16 = t.dtype == "bf16"
    a = 2 if bf16 else 4
    tokens = micro_batch * seq_len
    acts = activation_bytes_per_token(model_config, t.activation_checkpointing, t.activation_checkpointing_every,
                                      a=a, batch=micro_batch)
    activations = tokens * acts["saved"] + tokens * acts["recompute"] + acts["fixed"]
    loss = loss_peak_bytes(model_config, tokens)
    usable = int(memory * (1 - MEMORY_MARGIN))
    rows = []
    for stage in (0, 1, 2, 3):
        for ep in valid_expert_parallel_sizes(world, count.num_experts):
            row = PlanRow(stage, ep, supported=not (stage == 3 and ep > 1),
                          configured=(stage, ep) == (t.zero_stage, t.expert_parallel_size))
            if not row.supported:
                row.note = "not supported: ZeRO-3 with expert parallelism (launch/expert_parallel.py)"
            else:
                states = model_state_bytes(count, world, stage, ep, bf16)
                row.bytes = {**states, "activations": activations, "loss": loss}
                row.bytes["total"] = sum(row.bytes.values())
                row.fits = row.bytes["total"] <= usable
                if world == 1 and stage in (1, 2):
                    row.note = "one rank: runs as ZeRO-0"
            rows.append(row)
    fitting = [r for r in rows if r.fits]
    if fitting:  # least communication first: EP adds all-to-alls, ZeRO-3 all-gathers the weights (1.5x the
        # traffic of ZeRO 0-2, which move as much as an all-reduce); then the most memory left
        min(fitting, key=lambda r: (r.expert_parallel_size, r.zero_stage == 3, r.bytes["total"])).best = True
    flops = model_config.flops_per_token(seq_len)
    tokens_per_gpu = tokens * t.grad_accum_steps
    plan = Plan(
        model=run.model if isinstance(run.model, str) else model_config.model_type, world_size=world, nodes=nodes,
        gpus_per_node=gpus_per_node, gpu_memory=memory, usable_memory=usable, dtype=t.dtype,
        micro_batch_size=micro_batch, seq_len=seq_len, grad_accum_steps=t.grad_accum_steps,
        activation_checkpointing=t.activation_checkpointing if t.activation_checkpointing != "selective"
        else f"selective (every {t.activation_checkpointing_every})",
        parameters={"total": count.total, "expert": count.expert, "non_expert": count.non_expert,
                    "largest_module": count.largest_module,
                    "active": model_config.parameter_counts().active},
        flops_per_token=flops, tokens_per_step=tokens_per_gpu * world,
        step_seconds=tokens_per_gpu * flops / (gpu_flops * mfu), mfu=mfu, gpu_flops=gpu_flops,
        checkpoint=checkpoint_bytes(count, t.zero_stage, bf16), rows=rows,
    )
    if not fitting:
        plan.advice = what_to_change(plan, count, acts, model_config)
    return plan


def what_to_change(plan: Plan, count: ParameterCount, acts: dict, model_config) -> str:
    """Nothing fits: name the largest term of the smallest combination and what would bring it down."""
    rows = [r for r in plan.rows if r.supported]
    smallest = min(rows, key=lambda r: r.bytes["total"])
    terms = {k: v for k, v in smallest.bytes.items() if k != "total"}
    largest = max(terms, key=terms.get)
    over = smallest.bytes["total"] - plan.usable_memory
    lines = [f"nothing fits in {gib(plan.usable_memory)} GiB per GPU ({gib(plan.gpu_memory)} GiB less the "
             f"{MEMORY_MARGIN:.0%} margin). The smallest choice, ZeRO-{smallest.zero_stage} EP "
             f"{smallest.expert_parallel_size}, needs {gib(smallest.bytes['total'])} GiB: {gib(over)} GiB too much; "
             f"its largest term is {largest} ({gib(terms[largest])} GiB)."]
    states = terms["parameters"] + terms["gradients"] + terms["optimizer"]
    if largest in ("parameters", "gradients", "optimizer"):
        # ZeRO-3 model states shrink about as 1 / ranks: the ranks that would bring them under what is left
        room = plan.usable_memory - terms["activations"] - terms["loss"]
        if room > 0:
            w = 2 if plan.dtype == "bf16" else 4
            fixed = w * (2 * count.largest_module + count.largest_unit)
            ranks = math.ceil(count.total * (2 * w + 16) / max(1.0, room - fixed))  # model_state_bytes, stage 3
            lines.append(f"- more ranks: model states are {gib(states)} GiB per GPU; under ZeRO-3 about "
                         f"{max(ranks, plan.world_size + 1)} GPUs would hold them (--nodes / --gpus-per-node)")
        if smallest.zero_stage < 3:
            lines.append("- zero_stage=3 shards the parameters and gradients too")
        if count.expert and plan.world_size > 1:
            lines.append("- expert_parallel_size=N (ZeRO 1-2) splits the experts' weights over N ranks")
        if plan.dtype != "bf16":
            lines.append("- train.dtype=bf16 halves parameters, gradients and activations")
    else:
        lines.append(f"- activations and loss: {gib(terms['activations'] + terms['loss'])} GiB for one micro-batch of "
                     f"{plan.micro_batch_size} x {plan.seq_len} tokens")
        if not plan.activation_checkpointing.startswith("full"):
            lines.append("- train.activation_checkpointing=full keeps one hidden state per layer and token")
        room = plan.usable_memory - states - acts["fixed"]  # the head's weight gradient, whatever the batch
        per_sequence = (terms["activations"] - acts["fixed"] + terms["loss"]) / plan.micro_batch_size
        fitting_batch = int(room // per_sequence) if room > 0 else 0
        if fitting_batch >= 1:
            lines.append(f"- micro_batch_size={fitting_batch} fits (raise train.grad_accum_steps to keep the "
                         "global batch)")
        else:
            lines.append("- a smaller micro_batch_size or seq_len (raise train.grad_accum_steps to keep the "
                         "global batch)")
    return "\n".join(lines)


def format_plan(plan: Plan) -> str:
    """The plan as text: the model and cluster, then one table row per ZeRO stage and EP size (GiB per GPU)."""
    p = plan.parameters
    ckpt = plan.checkpoint
    lines = [
        f"model {plan.model}: {count_text(p['total'])} parameters ({count_text(p['expert'])} in routed experts, "
        f"{count_text(p['active'])} active per token); largest module {count_text(p['largest_module'])}",
        f"cluster: {plan.nodes} node(s) x {plan.gpus_per_node} GPU(s) = {plan.world_size} ranks, "
        f"{gib(plan.gpu_memory)} GiB each, {gib(plan.usable_memory)} GiB usable ({MEMORY_MARGIN:.0%} margin)",
        f"training: {plan.dtype}, micro-batch {plan.micro_batch_size} x {plan.seq_len} tokens, grad_accum "
        f"{plan.grad_accum_steps}, activation_checkpointing {plan.activation_checkpointing}",
        f"compute: {plan.flops_per_token / 1e9:.2f} GFLOPs per token; {plan.tokens_per_step:,} tokens per step take "
        f"{plan.step_seconds:.2f} s at MFU {plan.mfu:.2f} of {plan.gpu_flops / 1e12:.0f} TFLOP/s per GPU",
        f"checkpoint on disk: {gib(ckpt['total'])} GiB (model states {gib(ckpt['model'])}, optimizer "
        f"{gib(ckpt['optimizer'])}, hf/ {gib(ckpt['hf'])})",
        "",
        "GiB per GPU:",
    ]
    header = ["", "ZeRO", "EP", "params", "grads", "optimizer", "activations", "loss", "total", "fits"]
    table = [header]
    unsupported = [r for r in plan.rows if not r.supported]
    for r in plan.rows:
        mark = ">>" if r.best else ("*" if r.configured else "")
        if not r.supported:  # one line for all of them: ZeRO-3 with EP 2, 4, ...
            if r is unsupported[0]:
                sizes = [u.expert_parallel_size for u in unsupported]
                ep = f"{sizes[0]}-{sizes[-1]}" if len(sizes) > 1 else str(sizes[0])
                table.append([mark, str(r.zero_stage), ep, *["-"] * 6, "not supported (ZeRO-3 with EP)"])
            continue
        b = r.bytes
        fits = "yes" if r.fits else "no"
        table.append([mark, str(r.zero_stage), str(r.expert_parallel_size),
                      *(gib(b[k]) for k in ("parameters", "gradients", "optimizer", "activations", "loss", "total")),
                      fits + (f" ({r.note})" if r.note else "")])
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in table]
    lines.append("(>>: best fit, the least communication: smallest EP, ZeRO 0-2 before 3, then most memory left)")
    lines.append("(*: the run config's own zero_stage and expert_parallel_size)")
    if plan.advice:
        lines += ["", plan.advice]
    return "\n".join(lines)
