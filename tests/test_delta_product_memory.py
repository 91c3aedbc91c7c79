"""Memory of the DeltaProduct kernel and layer: what they keep for backward, and that recomputing it in
backward changes no gradient.

The chunk kernel keeps only its inputs and the state entering each block of chunks (_RecomputedScan);
the old path (autograd through the whole forward) stays reachable with _RECOMPUTE_IN_BACKWARD = False.
"""

import pytest
import torch

from seedlm.launch.metrics import saved_bytes_for_backward
from seedlm.model import delta_product_kernels as kernels
from seedlm.model import deltaproduct_layer
from seedlm.model.configuration_deltaproduct import DeltaProductConfig
from seedlm.model.modeling_deltaproduct import DeltaProductModel
from tests.test_delta_product_kernels import F64, _run_with_grads, make_inputs


def _chunk(*args, **kw):
    return kernels.chunk_delta_product(*args, **kw)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("use_g", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_recomputed_gradients_equal_old_path_and_recurrence(monkeypatch, n, use_g, varlen):
    """Several blocks of 2 chunks, documents starting mid-block, beta up to 2, initial states, and a
    gradient on the final states: recompute == autograd through the forward == the recurrence (fp64)."""
    B, T, H, K, V, C = 1, 45, 2, 8, 6, 4 * n
    monkeypatch.setattr(kernels, "_CPU_BLOCK_ELEMENTS", 2 * B * H * C * (C + 2 * (K + V)))
    offsets = [0, 7, 7, 30, 45] if varlen else None
    N = len(offsets) - 1 if varlen else B
    inputs = make_inputs(B=B, T=T, H=H, K=K, V=V, n=n, use_g=use_g, N=N, seed=30 + n, beta_max=2.0)
    cu = torch.tensor(offsets) if varlen else None
    gen = torch.Generator().manual_seed(31)
    d_o = torch.randn(B, T, H, V, generator=gen, dtype=F64)
    d_s = torch.randn(N, H, K, V, generator=gen, dtype=F64)

    new = _run_with_grads(_chunk, inputs, n, d_o, d_s, cu_seqlens=cu, chunk_size=C)
    monkeypatch.setattr(kernels, "_RECOMPUTE_IN_BACKWARD", False)
    old = _run_with_grads(_chunk, inputs, n, d_o, d_s, cu_seqlens=cu, chunk_size=C)
    ref = _run_with_grads(kernels.recurrent_delta_product, inputs, n, d_o, d_s, cu_seqlens=cu)
    names = ["q", "k", "v", "beta"] + (["g"] if use_g else []) + ["initial_state"]
    assert len(new[2]) == len(names) and all(x is not None for x in new[2])
    for name, a, b, c in zip(names, new[2], old[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=lambda m, name=name: f"{name} vs old: {m}")
        torch.testing.assert_close(a, c, rtol=0, atol=1e-9, msg=lambda m, name=name: f"{name} vs recurrence: {m}")
    torch.testing.assert_close(new[0], ref[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(new[1], ref[1], rtol=0, atol=1e-10)


def test_gradient_without_final_state(monkeypatch):
    """Only o is used (the training case): the final state gets no gradient and q..g still equal the old path."""
    n, C = 2, 8
    monkeypatch.setattr(kernels, "_CPU_BLOCK_ELEMENTS", 1)  # one chunk per block
    q, k, v, beta, g, _ = make_inputs(B=2, T=21, n=n, seed=40)
    grads = []
    for recompute in (True, False):
        monkeypatch.setattr(kernels, "_RECOMPUTE_IN_BACKWARD", recompute)
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, beta, g)]
        o, _ = kernels.chunk_delta_product(*leaves, num_householder=n, chunk_size=C)
        o.pow(2).sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _kernel_saved_bytes(T, recompute, monkeypatch, n=2, H=2, K=16, C=16):
    monkeypatch.setattr(kernels, "_RECOMPUTE_IN_BACKWARD", recompute)
    inputs = [x.float().requires_grad_(True) for x in make_inputs(B=1, T=T, H=H, K=K, V=K, n=n, seed=41)[:5]]
    return saved_bytes_for_backward(lambda: kernels.chunk_delta_product(*inputs, num_householder=n, chunk_size=C))


def test_kernel_keeps_inputs_and_block_states_only(monkeypatch):
    """Saved bytes <= the inputs (fp32) + one [H, K, V] state per block of chunks; the old path keeps more,
    and the bytes grow linearly with T."""
    n, H, K, C, T = 2, 2, 16, 16, 512
    monkeypatch.setattr(kernels, "_CPU_BLOCK_ELEMENTS", 2 * H * C * (C + 4 * K))  # 2 chunks per block
    blocks = -(-T * n // C) // 2
    input_bytes = 4 * T * (H * K + n * H * (K + K + 1) + H)  # q, k, v, beta, g
    bound = input_bytes + 4 * (blocks + 1) * H * K * K + 4096  # + entry states, + a little for small tensors
    new, old = _kernel_saved_bytes(T, True, monkeypatch), _kernel_saved_bytes(T, False, monkeypatch)
    assert new <= bound, f"recompute path saves {new} bytes, bound {bound}"
    assert old > bound, f"old path saves {old} bytes: the bound {bound} would not tell the two apart"
    doubled = _kernel_saved_bytes(2 * T, True, monkeypatch)
    assert doubled <= 2.1 * new, f"saved bytes at 2T {doubled} vs at T {new}: not linear"


def _tiny_model(**overrides):
    config = DeltaProductConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=8,
                                num_householder=2, intermediate_size=64, chunk_size=8, **overrides)
    torch.manual_seed(0)
    return DeltaProductModel(config).double().train()


@pytest.mark.parametrize("packed", [False, True])
def test_layer_recompute_keeps_gradients_and_saves_less(monkeypatch, packed):
    """The layer's recomputed stretches (convs, norms, kernel) give the same gradients as keeping everything,
    and keep fewer bytes. packed: two documents in a row (doc_ids, cu_seqlens)."""
    model = _tiny_model()
    T = 40
    ids = torch.randint(0, 32, (2, T), generator=torch.Generator().manual_seed(1))
    position_ids = torch.cat([torch.arange(15), torch.arange(T - 15)])[None].expand(2, -1) if packed else None

    def loss():
        return model(input_ids=ids, position_ids=position_ids).last_hidden_state.pow(2).mean()

    def grads():
        model.zero_grad()
        loss().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    new_grads, new_bytes = grads(), saved_bytes_for_backward(loss)
    monkeypatch.setattr(deltaproduct_layer, "_recomputed", lambda fn, *args: fn(*args))
    monkeypatch.setattr(kernels, "_RECOMPUTE_IN_BACKWARD", False)
    old_grads, old_bytes = grads(), saved_bytes_for_backward(loss)
    assert new_grads.keys() == old_grads.keys() and any("conv1d" in name for name in new_grads)
    for name in old_grads:
        torch.testing.assert_close(new_grads[name], old_grads[name], rtol=0, atol=1e-12, msg=name)
    assert new_bytes < 0.6 * old_bytes, f"recompute keeps {new_bytes} bytes, everything {old_bytes}"
