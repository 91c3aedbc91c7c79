"""The DeltaProduct training kernel choice: fla only after a forward + backward parity check against the torch
kernel on the run's head shapes; the torch kernel, with a logged reason, wherever fla does not apply."""

import functools
import logging

import torch

from seedlm.model import chunk_delta_product, fla_backend
from seedlm.model.fla_backend import kernel_disagreement, select_kernel, training_kernel
from tests.test_deltaproduct_model import make_model

SHAPES = dict(num_heads=2, head_k_dim=16, head_v_dim=16, num_householder=2, gated=True)
TORCH_KERNEL = functools.partial(chunk_delta_product, backend="torch", chunk_size=16)


def perturbed_output(**kwargs):
    o, state = TORCH_KERNEL(**kwargs)
    return o * 1.05, state


def perturbed_key_gradient(k, **kwargs):
    # the same forward; the gradient reaching k is 5% too large (a wrong dk, as in fla issue 984)
    k = k + 0.05 * (k - k.detach())
    return TORCH_KERNEL(k=k, **kwargs)


def test_the_torch_kernel_agrees_with_itself_in_fp32_and_bf16():
    assert kernel_disagreement(TORCH_KERNEL, TORCH_KERNEL, dtype=torch.float32, device=torch.device("cpu"),
                               seq_len=40, **SHAPES) is None
    # bf16 inputs against the fp32 reference: within the bf16 tolerance
    assert kernel_disagreement(TORCH_KERNEL, TORCH_KERNEL, dtype=torch.bfloat16, device=torch.device("cpu"),
                               seq_len=40, **SHAPES) is None


def test_a_wrong_output_or_gradient_is_named():
    cpu = torch.device("cpu")
    problem = kernel_disagreement(perturbed_output, TORCH_KERNEL, dtype=torch.float32, device=cpu, seq_len=40,
                                  **SHAPES)
    assert problem.startswith("relative RMS error beyond 0.02: o 0.05, dq 0.05, dk 0.05")  # d_o is 5% off too
    problem = kernel_disagreement(perturbed_key_gradient, TORCH_KERNEL, dtype=torch.float32, device=cpu,
                                  seq_len=40, **SHAPES)
    assert problem == "relative RMS error beyond 0.02: dk 0.05"
    # ungated (g = None) shapes are checked too
    ungated = {**SHAPES, "gated": False}
    assert kernel_disagreement(perturbed_key_gradient, TORCH_KERNEL, dtype=torch.float32, device=cpu, seq_len=40,
                               **ungated) == "relative RMS error beyond 0.02: dk 0.05"


def test_without_fla_or_cuda_the_torch_kernel_is_chosen_with_the_reason():
    backend, why = select_kernel(**SHAPES, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert backend == "torch"
    assert why in ("flash-linear-attention is not installed", "fla runs on CUDA only, the model is on cpu")


def test_training_logs_the_choice_once_per_head_shape(caplog, monkeypatch):
    monkeypatch.setattr(fla_backend, "_chosen", {})
    model = make_model(dtype=torch.float32).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with caplog.at_level(logging.INFO, logger=fla_backend.__name__):
        for _ in range(2):
            model(ids, labels=ids).loss.backward()
    lines = [r.getMessage() for r in caplog.records if r.name == fla_backend.__name__]
    assert len(lines) == 1, lines  # two layers of one shape, two steps: one choice
    assert lines[0].startswith("DeltaProduct kernel for H=2 K=8 V=8 n_h=2 gated=True: torch (")
    assert training_kernel(2, 8, 8, 2, True, torch.float32, torch.device("cpu")) == "torch"
