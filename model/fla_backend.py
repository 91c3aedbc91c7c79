"""Which DeltaProduct chunk kernel a run trains on: flash-linear-attention's Triton kernel, or the torch kernel.

fla's kernels have shipped wrong gradients on Hopper more than once (its gated backward with Triton
3.4-3.7.0, fla issue 640; dk/dbeta at chunk_size 64 on H100/H200, fla issue 984). So before the first
training step on fla, fla's forward and backward are compared once with the torch kernel's on the run's own
head shapes; where they disagree beyond the bf16 tolerance the run stays on the torch kernel, and the
reason is logged. The choice is made once per process and head shape.

Imports only the standard library, torch and sibling files (exported with the checkpoint); fla stays optional.
"""

import functools
import logging

import torch

from .delta_product_kernels import _fla_chunk_gated_delta_product, _fla_gated_backward_refused, chunk_delta_product

logger = logging.getLogger(__name__)

# relative RMS error, as fla's own tests measure it; the torch kernel runs in fp32 as the reference
BF16_TOLERANCE = 2e-2

_chosen: dict[tuple, str] = {}  # (head shapes, gated, dtype, device) -> "fla" | "torch"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """RMS of the difference over the RMS of the expected tensor."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-12))


def kernel_inputs(num_heads, head_k_dim, head_v_dim, num_householder, gated, seq_len, dtype, device, seed=0):
    """Random inputs like the layer's, in the kernels' convention, with two packed documents: q [1, T, H, K]
    and keys L2-normalised, beta in (0, 2), g <= 0 log-decay (or None), cu_seqlens [0, T // 3, T]."""
    generator = torch.Generator().manual_seed(seed)
    H, K, V, n, T = num_heads, head_k_dim, head_v_dim, num_householder, seq_len

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    inputs = {
        "q": torch.nn.functional.normalize(rand(1, T, H, K), dim=-1),
        "k": torch.nn.functional.normalize(rand(1, T * n, H, K), dim=-1),
        "v": rand(1, T * n, H, V),
        "beta": 2 * torch.sigmoid(rand(1, T * n, H)),
        "g": torch.nn.functional.logsigmoid(rand(1, T, H)) if gated else None,
    }
    inputs = {name: x.to(device=device, dtype=dtype) if x is not None else None for name, x in inputs.items()}
    inputs["cu_seqlens"] = torch.tensor([0, T // 3, T], device=device, dtype=torch.long)
    return inputs


def kernel_disagreement(candidate, reference, num_heads, head_k_dim, head_v_dim, num_householder, gated,
                        dtype, device, seq_len=256, tolerance=BF16_TOLERANCE) -> str | None:
    """Run candidate (in dtype) and reference (in fp32, on the same values) forward and backward, both with
    chunk_delta_product's signature. Returns None when the output and every input gradient agree within
    tolerance, else a line naming each tensor beyond it (o, dq, dk, dv, dbeta, dg) and its relative error."""
    inputs = kernel_inputs(num_heads, head_k_dim, head_v_dim, num_householder, gated, seq_len, dtype, device)
    names = [name for name in ("q", "k", "v", "beta", "g") if inputs[name] is not None]
    results = []
    for kernel, run_dtype in ((candidate, dtype), (reference, torch.float32)):
        leaves = {name: inputs[name].detach().to(run_dtype).requires_grad_() for name in names}
        o, _ = kernel(**leaves, cu_seqlens=inputs["cu_seqlens"], num_householder=num_householder)
        d_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.device, o.dtype)
        grads = torch.autograd.grad(o, [leaves[name] for name in names], d_o)
        results.append({"o": o, **{"d" + name: grad for name, grad in zip(names, grads)}})
    errors = {name: relative_error(results[0][name], results[1][name]) for name in results[1]}
    beyond = [f"{name} {error:.3g}" for name, error in errors.items() if not error <= tolerance]  # NaN is beyond
    if not beyond:
        return None
    return f"relative RMS error beyond {tolerance:g}: {', '.join(beyond)}"


def select_kernel(num_heads, head_k_dim, head_v_dim, num_householder, gated, dtype, device) -> tuple[str, str]:
    """("fla" or "torch", why) for training on these head shapes."""
    if _fla_chunk_gated_delta_product is None:
        return "torch", "flash-linear-attention is not installed"
    if device.type != "cuda":
        return "torch", f"fla runs on CUDA only, the model is on {device.type}"
    if dtype not in (torch.bfloat16, torch.float16):
        return "torch", f"fla runs in bf16/fp16 only, the model is in {dtype}"
    with torch.enable_grad():
        if _fla_gated_backward_refused(torch.empty(0, device=device), torch.empty(0) if gated else None):
            import triton

            return "torch", f"fla refuses its gated backward on Hopper with Triton {triton.__version__} (3.4-3.7.0)"
    fla = functools.partial(chunk_delta_product, backend="fla")
    torch_kernel = functools.partial(chunk_delta_product, backend="torch")
    problem = kernel_disagreement(fla, torch_kernel, num_heads, head_k_dim, head_v_dim, num_householder, gated,
                                  dtype, device)
    if problem is not None:
        return "torch", f"fla disagrees with the torch kernel on these head shapes: {problem}"
    return "fla", "fla matches the torch kernel forward and backward on these head shapes"


@torch.compiler.disable  # runs once, eagerly, outside any compiled block's graph
def training_kernel(num_heads, head_k_dim, head_v_dim, num_householder, gated, dtype, device) -> str:
    """The kernel backend ("fla" or "torch") to train with, chosen and logged once per process and shape."""
    key = (num_heads, head_k_dim, head_v_dim, num_householder, gated, dtype, str(device))
    if key not in _chosen:
        backend, why = select_kernel(num_heads, head_k_dim, head_v_dim, num_householder, gated, dtype, device)
        _chosen[key] = backend
        shapes = f"H={num_heads} K={head_k_dim} V={head_v_dim} n_h={num_householder} gated={gated}"
        log = logger.warning if device.type == "cuda" and backend == "torch" else logger.info
        log(f"DeltaProduct kernel for {shapes}: {backend} ({why})")
    return _chosen[key]
