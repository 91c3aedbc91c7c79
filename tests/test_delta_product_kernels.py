"""DeltaProduct kernels: recurrence vs a naive loop, chunk form vs recurrence (values and gradients).

The kernel file is loaded by path, exactly as the Hugging Face module cache would load it: this also
checks that it imports nothing from seedlm.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

_PATH = Path(__file__).resolve().parents[1] / "model" / "delta_product_kernels.py"
_spec = importlib.util.spec_from_file_location("delta_product_kernels_standalone", _PATH)
kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernels)
chunk_delta_product = kernels.chunk_delta_product
recurrent_delta_product = kernels.recurrent_delta_product

F64 = torch.float64


def make_inputs(B=2, T=37, H=2, K=8, V=6, n=2, use_g=True, dtype=F64, seed=0, N=None, beta_max=2.0):
    """Random inputs in the kernel convention: L2-normalised keys (as the layer gives), beta in [0, beta_max]."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    q = r(B, T, H, K)
    k = F.normalize(r(B, T * n, H, K), dim=-1)
    v = r(B, T * n, H, V)
    beta = torch.rand(B, T * n, H, generator=gen, dtype=F64) * beta_max
    g = F.logsigmoid(r(B, T, H) + 2.0) if use_g else None  # decays in about (0.5, 1)
    h0 = r(B if N is None else N, H, K, V) * 0.5
    out = [q, k, v, beta, g, h0]
    return [x.to(dtype) if x is not None else None for x in out]


def naive_delta_product(q, k, v, beta, g, h0, n, scale=None):
    """The recurrence written literally, one (batch, head) and one vector at a time, in float64."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    o = torch.zeros(B, T, H, V, dtype=F64)
    S_out = torch.zeros(B, H, K, V, dtype=F64)
    for b in range(B):
        for h in range(H):
            S = h0[b, h].double().clone() if h0 is not None else torch.zeros(K, V, dtype=F64)
            for t in range(T):
                if g is not None:
                    S = torch.exp(g[b, t, h].double()) * S
                for j in range(n):
                    p = t * n + j
                    kj, vj, bj = k[b, p, h].double(), v[b, p, h].double(), beta[b, p, h].double()
                    S = S + bj * torch.outer(kj, vj - S.T @ kj)
                o[b, t, h] = S.T @ (scale * q[b, t, h].double())
            S_out[b, h] = S
    return o, S_out


# ----------------------------------------------------------------------------------------------
# recurrence vs the naive loop
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("use_g", [False, True])
def test_recurrence_matches_naive(n, use_g):
    q, k, v, beta, g, h0 = make_inputs(B=2, T=13, n=n, use_g=use_g)
    o_ref, s_ref = naive_delta_product(q, k, v, beta, g, h0, n)
    o, s = recurrent_delta_product(q, k, v, beta, g, initial_state=h0, output_final_state=True, num_householder=n)
    assert o.dtype == F64 and s.dtype == F64
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-12)
    # custom scale, no initial state, no final state requested
    o_ref, _ = naive_delta_product(q, k, v, beta, g, None, n, scale=0.3)
    o, s = recurrent_delta_product(q, k, v, beta, g, scale=0.3, num_householder=n)
    assert s is None
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)


def test_recurrence_decode_steps_equal_one_call():
    """The decode path: T=1 calls with carried state give the same outputs as one call."""
    n = 2
    q, k, v, beta, g, h0 = make_inputs(B=2, T=6, n=n)
    o_all, s_all = recurrent_delta_product(q, k, v, beta, g, initial_state=h0, output_final_state=True,
                                           num_householder=n)
    s, outs = h0, []
    for t in range(6):
        o_t, s = recurrent_delta_product(q[:, t : t + 1], k[:, t * n : t * n + n], v[:, t * n : t * n + n],
                                         beta[:, t * n : t * n + n], g[:, t : t + 1], initial_state=s,
                                         output_final_state=True, num_householder=n)
        outs.append(o_t)
    torch.testing.assert_close(torch.cat(outs, 1), o_all, rtol=0, atol=1e-13)
    torch.testing.assert_close(s, s_all, rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# chunk form vs recurrence, forward and backward, float64
# ----------------------------------------------------------------------------------------------


def _run_with_grads(fn, inputs, n, d_o, d_s, **kw):
    q, k, v, beta, g, h0 = [x.clone().requires_grad_(True) if x is not None else None for x in inputs]
    o, s = fn(q, k, v, beta, g, initial_state=h0, output_final_state=True, num_householder=n, **kw)
    ((o * d_o).sum() + (s * d_s).sum()).backward()
    grads = [x.grad for x in (q, k, v, beta, g, h0) if x is not None]
    return o.detach(), s.detach(), grads


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("use_g", [False, True])
def test_chunk_matches_recurrence_fwd_bwd(n, use_g):
    # T=37 is not a multiple of the 16 // n tokens per chunk: padding is exercised
    inputs = make_inputs(B=2, T=37, H=2, K=8, V=6, n=n, use_g=use_g, seed=n)
    gen = torch.Generator().manual_seed(100 + n)
    d_o = torch.randn(2, 37, 2, 6, generator=gen, dtype=F64)
    d_s = torch.randn(2, 2, 8, 6, generator=gen, dtype=F64)
    o_r, s_r, g_r = _run_with_grads(recurrent_delta_product, inputs, n, d_o, d_s)
    o_c, s_c, g_c = _run_with_grads(chunk_delta_product, inputs, n, d_o, d_s, chunk_size=16)
    torch.testing.assert_close(o_c, o_r, rtol=0, atol=1e-10)
    torch.testing.assert_close(s_c, s_r, rtol=0, atol=1e-10)
    names = ["q", "k", "v", "beta"] + (["g"] if use_g else []) + ["initial_state"]
    assert len(g_c) == len(names)
    for name, a, b in zip(names, g_c, g_r):
        assert a is not None, f"no gradient for {name}"
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}")


def _blocked_case(monkeypatch, chunks_per_block, T, offsets, seed, n=2, B=1, H=2, K=8, V=6, C=8):
    """Blocks of `chunks_per_block` chunks of C positions; inputs (float64), cu_seqlens (None unpacked) and the
    output and final-state gradients for a run over T tokens, packed at `offsets` when given."""
    monkeypatch.setattr(kernels, "_CPU_BLOCK_ELEMENTS", chunks_per_block * B * H * C * (C + 2 * (K + V)))
    N = len(offsets) - 1 if offsets else B
    inputs = make_inputs(B=B, T=T, H=H, K=K, V=V, n=n, N=N, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    d_o = torch.randn(B, T, H, V, generator=gen, dtype=F64)
    d_s = torch.randn(N, H, K, V, generator=gen, dtype=F64)
    return inputs, (torch.tensor(offsets) if offsets else None), d_o, d_s


@pytest.mark.parametrize("chunks_per_block", [1, 3])
@pytest.mark.parametrize("varlen", [False, True])
def test_cache_blocks_match_recurrence(monkeypatch, chunks_per_block, varlen):
    """On CPU long inputs run in blocks of chunks; force tiny blocks so the hand-over is exercised."""
    n, C = 2, 8
    inputs, cu, d_o, d_s = _blocked_case(monkeypatch, chunks_per_block, T=37, offsets=[0, 9, 9, 30, 37] if varlen
                                         else None, seed=21)
    o_r, s_r, g_r = _run_with_grads(recurrent_delta_product, inputs, n, d_o, d_s, cu_seqlens=cu)
    o_c, s_c, g_c = _run_with_grads(chunk_delta_product, inputs, n, d_o, d_s, cu_seqlens=cu, chunk_size=C)
    torch.testing.assert_close(o_c, o_r, rtol=0, atol=1e-10)
    torch.testing.assert_close(s_c, s_r, rtol=0, atol=1e-10)
    for a, b in zip(g_c, g_r):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 64])
def test_chunk_sizes(chunk_size):
    """chunk_size below n_h (one token per chunk), odd sizes, and one chunk larger than T."""
    n = 3
    q, k, v, beta, g, h0 = make_inputs(B=1, T=11, n=n)
    o_r, s_r = recurrent_delta_product(q, k, v, beta, g, initial_state=h0, output_final_state=True,
                                       num_householder=n)
    o_c, s_c = chunk_delta_product(q, k, v, beta, g, initial_state=h0, output_final_state=True,
                                   num_householder=n, chunk_size=chunk_size)
    torch.testing.assert_close(o_c, o_r, rtol=0, atol=1e-11)
    torch.testing.assert_close(s_c, s_r, rtol=0, atol=1e-11)


@pytest.mark.parametrize("use_g", [False, True])
def test_varlen_equals_separate_runs(use_g):
    n, H, K, V = 2, 2, 8, 6
    offsets = [0, 5, 5, 21, 40]  # includes an empty document and lengths off the chunk grid
    N, T = len(offsets) - 1, offsets[-1]
    q, k, v, beta, g, h0 = make_inputs(B=1, T=T, H=H, K=K, V=V, n=n, use_g=use_g, N=N, seed=7)
    cu = torch.tensor(offsets, dtype=torch.long)
    gen = torch.Generator().manual_seed(8)
    d_o = torch.randn(1, T, H, V, generator=gen, dtype=F64)
    d_s = torch.randn(N, H, K, V, generator=gen, dtype=F64)

    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in (q, k, v, beta, g, h0)]
    o, s = chunk_delta_product(*leaves[:5], initial_state=leaves[5], output_final_state=True, cu_seqlens=cu,
                               num_householder=n, chunk_size=8)
    ((o * d_o).sum() + (s * d_s).sum()).backward()
    o_rec, s_rec = recurrent_delta_product(q, k, v, beta, g, initial_state=h0, output_final_state=True,
                                           cu_seqlens=cu, num_householder=n)
    torch.testing.assert_close(o.detach(), o_rec, rtol=0, atol=1e-11)
    torch.testing.assert_close(s.detach(), s_rec, rtol=0, atol=1e-11)

    # the same documents run one at a time, each from its own initial state
    sep = [x.clone().requires_grad_(True) if x is not None else None for x in (q, k, v, beta, g, h0)]
    for i, (a, b) in enumerate(zip(offsets, offsets[1:])):
        o_i, s_i = chunk_delta_product(
            sep[0][:, a:b], sep[1][:, a * n : b * n], sep[2][:, a * n : b * n], sep[3][:, a * n : b * n],
            sep[4][:, a:b] if use_g else None, initial_state=sep[5][i : i + 1], output_final_state=True,
            num_householder=n, chunk_size=8,
        )
        torch.testing.assert_close(o[:, a:b].detach(), o_i.detach(), rtol=0, atol=1e-11)
        torch.testing.assert_close(s[i : i + 1].detach(), s_i.detach(), rtol=0, atol=1e-11)
        ((o_i * d_o[:, a:b]).sum() + (s_i * d_s[i : i + 1]).sum()).backward()
    assert torch.equal(s[1], h0[1])  # the empty document passes its state through
    for a, b in zip(leaves, sep):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("fn", [chunk_delta_product, recurrent_delta_product])
def test_carried_state_equals_one_call(fn):
    n, T1 = 2, 20
    q, k, v, beta, g, h0 = make_inputs(B=2, T=37, n=n, seed=3)
    kw = dict(chunk_size=16) if fn is chunk_delta_product else {}
    o, s = fn(q, k, v, beta, g, initial_state=h0, output_final_state=True, num_householder=n, **kw)
    o1, s1 = fn(q[:, :T1], k[:, : T1 * n], v[:, : T1 * n], beta[:, : T1 * n], g[:, :T1], initial_state=h0,
                output_final_state=True, num_householder=n, **kw)
    o2, s2 = fn(q[:, T1:], k[:, T1 * n :], v[:, T1 * n :], beta[:, T1 * n :], g[:, T1:], initial_state=s1,
                output_final_state=True, num_householder=n, **kw)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=0, atol=1e-11)
    torch.testing.assert_close(s2, s, rtol=0, atol=1e-11)


@pytest.mark.parametrize("fn", [chunk_delta_product, recurrent_delta_product])
def test_non_contiguous_inputs(fn):
    """Slices of a fused projection (as a layer produces them) are accepted and give the same numbers."""
    n = 2
    q, k, v, beta, g, h0 = make_inputs(B=2, T=9, n=n, seed=4)
    fused = torch.cat([k, v, beta.unsqueeze(-1)], dim=-1)  # [B, T*n, H, K+V+1]
    k2, v2, beta2 = fused[..., :8], fused[..., 8:14], fused[..., 14]
    assert not k2.is_contiguous()
    o, s = fn(q, k, v, beta, g, initial_state=h0, output_final_state=True, num_householder=n)
    o2, s2 = fn(q, k2, v2, beta2, g, initial_state=h0, output_final_state=True, num_householder=n)
    torch.testing.assert_close(o2, o, rtol=0, atol=1e-13)
    torch.testing.assert_close(s2, s, rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# numerical stability and low precision
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_value", [None, 2.0])
def test_no_decay_long_sequence_is_stable(beta_value):
    """g = None, beta up to 2 (exactly 2: pure reflections), fp32 chunk kernel over 512 interleaved steps."""
    n, T = 2, 256
    q, k, v, beta, _, _ = make_inputs(B=1, T=T, H=2, K=16, V=16, n=n, use_g=False, seed=11)
    if beta_value is not None:
        beta = torch.full_like(beta, beta_value)
    o_ref, s_ref = recurrent_delta_product(q, k, v, beta, None, output_final_state=True, num_householder=n)
    o, s = chunk_delta_product(*(x.float() for x in (q, k, v, beta)), output_final_state=True,
                               num_householder=n, chunk_size=64)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    # fp32 accumulation over 512 steps, values O(1): a few 1e-5 at most
    torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=2e-4)
    torch.testing.assert_close(s.double(), s_ref, rtol=0, atol=2e-4)


def test_strong_decay_has_no_overflow():
    """Large negative g underflows exp to 0 inside a chunk; values and gradients stay finite."""
    n = 2
    q, k, v, beta, g, h0 = make_inputs(B=1, T=40, n=n, seed=5)
    g = (g * 200).float().requires_grad_(True)  # about -100 per token: cumulative sums reach -4000
    o, s = chunk_delta_product(q.float(), k.float(), v.float(), beta.float(), g, initial_state=h0.float(),
                               output_final_state=True, num_householder=n, chunk_size=64)
    (o.sum() + s.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(s).all() and torch.isfinite(g.grad).all()
    o_ref, s_ref = recurrent_delta_product(q, k, v, beta, g.detach().double(), initial_state=h0,
                                           output_final_state=True, num_householder=n)
    torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3])
def test_bf16_inputs_within_bound(n):
    """bf16 in, fp32 math inside, bf16 out: error vs the fp64 result on the same (rounded) inputs.

    Bound: one bf16 rounding of the output (relative 2**-8) plus fp32 accumulation, i.e. at most
    1/128 of the output's largest magnitude.
    """
    inputs = make_inputs(B=2, T=61, H=2, K=16, V=16, n=n, dtype=torch.bfloat16, seed=9)
    q, k, v, beta, g, h0 = inputs
    o, s = chunk_delta_product(q, k, v, beta, g, initial_state=h0, output_final_state=True, num_householder=n)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    up = [x.double() for x in inputs]
    o_ref, s_ref = recurrent_delta_product(*up[:5], initial_state=up[5], output_final_state=True,
                                           num_householder=n)
    bound = o_ref.abs().max().item() / 128
    err = (o.double() - o_ref).abs().max().item()
    assert err <= bound, f"bf16 output error {err:.3g} above bound {bound:.3g}"
    # the state never goes through bf16: fp32 accuracy
    torch.testing.assert_close(s.double(), s_ref, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------


def _bad_cases():
    q, k, v, beta, g, h0 = make_inputs(B=2, T=5, n=2, dtype=torch.float32)
    ok = dict(q=q, k=k, v=v, beta=beta, g=g, initial_state=h0, num_householder=2)
    one = dict(ok, q=q[:1], k=k[:1], v=v[:1], beta=beta[:1], g=g[:1], initial_state=None)
    return [
        ("k length", dict(ok, k=k[:, :5]), "k must be"),
        ("num_householder vs k", dict(ok, num_householder=3), "k must be"),
        ("v length", dict(ok, v=v[:, :9]), "v must be"),
        ("beta shape", dict(ok, beta=beta[..., None]), "beta must be"),
        ("g per key", dict(ok, g=torch.zeros(2, 10, 2)), "g must be"),
        ("q rank", dict(ok, q=q[0]), "q must be"),
        ("initial_state", dict(ok, initial_state=h0[:1]), "initial_state must be"),
        ("num_householder 0", dict(ok, num_householder=0), "num_householder"),
        ("cu_seqlens with B=2", dict(ok, initial_state=None, cu_seqlens=torch.tensor([0, 2, 5])), "batch size 1"),
        ("cu_seqlens end", dict(one, cu_seqlens=torch.tensor([0, 2, 4])), "cu_seqlens must"),
        ("cu_seqlens order", dict(one, cu_seqlens=torch.tensor([0, 3, 2, 5])), "cu_seqlens must"),
        ("states per sequence", dict(one, cu_seqlens=torch.tensor([0, 2, 5]), initial_state=h0[:1]),
         "initial_state must be"),
    ]


@pytest.mark.parametrize("fn", [chunk_delta_product, recurrent_delta_product])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_shapes_raise(fn, case):
    _, kwargs, match = case
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)


def test_bad_chunk_options_raise():
    q, k, v, beta, g, _ = make_inputs(B=1, T=4, n=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_delta_product(q, k, v, beta, g, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        chunk_delta_product(q, k, v, beta, g, backend="triton")
    with pytest.raises(ValueError, match="backend='fla'"):
        chunk_delta_product(q, k, v, beta, g, backend="fla")  # CPU fp32: fla cannot serve it


# ----------------------------------------------------------------------------------------------
# the fused CPU kernel (model/delta_product_cpu.cpp), fp32, against the float64 recurrence
# ----------------------------------------------------------------------------------------------

fused = kernels.delta_product_cpu


def _count_fused_blocks(monkeypatch):
    """Counts the blocks the fused kernel ran, forward and backward."""
    calls = {"forward": 0, "backward": 0}
    for direction in calls:
        real = getattr(fused, f"block_{direction}")

        def counted(*args, _real=real, _direction=direction, **kw):
            calls[_direction] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(fused, f"block_{direction}", counted)
    return calls


def test_fused_cpu_kernel_builds_where_a_compiler_is():
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("no g++ on this machine: the torch ops serve (the fallback is tested below)")
    assert fused.library() is not None


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("use_g", [False, True])
def test_fused_cpu_kernel_matches_recurrence_fwd_bwd(monkeypatch, n, use_g):
    if fused.library() is None:
        pytest.skip("the fused kernel is not built here")
    calls = _count_fused_blocks(monkeypatch)
    inputs = make_inputs(B=2, T=45, H=3, K=16, V=12, n=n, use_g=use_g, seed=40 + n)
    gen = torch.Generator().manual_seed(140 + n)
    d_o = torch.randn(2, 45, 3, 12, generator=gen, dtype=F64)
    d_s = torch.randn(2, 3, 16, 12, generator=gen, dtype=F64)
    o_r, s_r, g_r = _run_with_grads(recurrent_delta_product, inputs, n, d_o, d_s)
    f32 = [x.float() if x is not None else None for x in inputs]
    o_c, s_c, g_c = _run_with_grads(chunk_delta_product, f32, n, d_o.float(), d_s.float(), chunk_size=16)
    assert calls == {"forward": 1, "backward": 1}
    names = ["o", "state", "q", "k", "v", "beta"] + (["g"] if use_g else []) + ["initial_state"]
    for name, a, b in zip(names, [o_c, s_c, *g_c], [o_r, s_r, *g_r]):
        assert a.dtype == torch.float32
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < 2e-6, f"{name}: max error {err:.2e} of its largest value"


@pytest.mark.parametrize("varlen", [False, True])
def test_fused_cpu_blocks_hand_over_to_each_other_and_to_the_torch_ops(monkeypatch, varlen):
    """Blocks of 2 chunks: the state passes between fused blocks, and with packed documents the blocks where a
    document starts take the torch ops while the others run fused."""
    if fused.library() is None:
        pytest.skip("the fused kernel is not built here")
    calls = _count_fused_blocks(monkeypatch)
    n, C = 2, 8
    inputs, cu, d_o, d_s = _blocked_case(monkeypatch, 2, T=61, offsets=[0, 3, 40, 61] if varlen else None, seed=23)
    o_r, s_r, g_r = _run_with_grads(recurrent_delta_product, inputs, n, d_o, d_s, cu_seqlens=cu)
    f32 = [x.float() for x in inputs]
    o_c, s_c, g_c = _run_with_grads(chunk_delta_product, f32, n, d_o.float(), d_s.float(), cu_seqlens=cu,
                                    chunk_size=C)
    # 4 tokens a chunk: 16 chunks in 8 blocks; packed, 1 + 10 + 6 = 17 chunks in 9 blocks, documents starting in
    # blocks 0, 0 and 5 (those two take the torch ops)
    assert calls["forward"] == calls["backward"] == (7 if varlen else 8)
    for a, b in zip([o_c, s_c, *g_c], [o_r, s_r, *g_r]):
        assert (a.double() - b).abs().max() / b.abs().max() < 2e-6


def test_fused_cpu_kernel_that_fails_to_build_falls_back_with_a_warning(monkeypatch, tmp_path):
    broken = tmp_path / "delta_product_cpu.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(fused, "SOURCE", broken)
    monkeypatch.setattr(fused, "_library", False)
    monkeypatch.setenv("SEEDLM_KERNEL_CACHE", str(tmp_path / "cache"))
    inputs = [x.float() for x in make_inputs(B=1, T=20, n=2, use_g=True)]
    with pytest.warns(UserWarning, match="could not be built, the torch ops serve instead"):
        o, s = chunk_delta_product(*inputs[:5], initial_state=inputs[5], output_final_state=True, num_householder=2)
    o_r, s_r = recurrent_delta_product(*inputs[:5], initial_state=inputs[5], output_final_state=True,
                                       num_householder=2)
    torch.testing.assert_close(o, o_r, rtol=0, atol=1e-5)
    assert fused.library() is None  # tried once: no warning, no build at every call


def test_fused_cpu_kernel_can_be_turned_off(monkeypatch, recwarn):
    monkeypatch.setattr(fused, "_library", False)
    monkeypatch.setenv("SEEDLM_FUSED_CPU_KERNEL", "0")
    assert fused.library() is None
    inputs = [x.float() for x in make_inputs(B=1, T=20, n=2, use_g=True)]
    calls = _count_fused_blocks(monkeypatch)
    chunk_delta_product(*inputs[:5], initial_state=inputs[5], num_householder=2)
    assert calls == {"forward": 0, "backward": 0} and not recwarn.list
