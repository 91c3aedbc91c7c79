"""DeltaProduct kernels in plain PyTorch: a step-by-step recurrence and a chunk-parallel form.

Both follow flash-linear-attention's ``gated_delta_product`` tensor convention, so that its Triton
kernel can serve as a CUDA backend:

- ``q`` [B, T, H, K]; ``k`` [B, T*n_h, H, K] and ``v`` [B, T*n_h, H, V], the n_h keys of token t at
  positions t*n_h ... t*n_h+n_h-1; ``beta`` [B, T*n_h, H]; ``g`` [B, T, H] log-space decay or None;
- ``initial_state`` [N, H, K, V] (N = B, or the number of sequences with ``cu_seqlens``);
- returns ``(o [B, T, H, V] in q's dtype, final_state [N, H, K, V] or None)``.

Per token t, with S the [K, V] state::

    S <- exp(g_t) * S
    for j in 0..n_h-1:  S <- S + beta_j k_j (v_j - S^T k_j)^T
    o_t = S^T (scale * q_t)

The kernels do not normalise q or k (the layer does). Math runs in fp32 (fp64 when the inputs are
fp64); the final state is returned in that dtype.

This file is copied into the Hugging Face module cache for ``trust_remote_code`` loading: it imports
only the standard library and torch; flash-linear-attention and the fused CPU kernel (delta_product_cpu.py,
which builds delta_product_cpu.cpp) are optional, guarded imports.
"""

from __future__ import annotations

import torch

try:  # optional CUDA backend; the torch paths below never need it
    from fla.ops.gated_delta_product import chunk_gated_delta_product as _fla_chunk_gated_delta_product
except Exception:  # ImportError, or a broken triton install
    _fla_chunk_gated_delta_product = None


def _sibling_module(name: str):
    """model/<name>.py loaded by path, for when this file is loaded by path itself (tests, benchmarks); None if
    it is not beside this file (remote code copies only this one)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name(f"{name}.py")
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"{__name__}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


try:  # the fused CPU kernel (delta_product_cpu.py/.cpp): optional, the torch ops below serve without it
    from . import delta_product_cpu
except ImportError:  # not a package module
    delta_product_cpu = _sibling_module("delta_product_cpu")

__all__ = ["chunk_delta_product", "recurrent_delta_product"]


# ----------------------------------------------------------------------------------------------
# Input checks shared by both kernels
# ----------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, beta, g, initial_state, cu_seqlens, num_householder):
    """Validate the convention above; return (B, T, H, K, V, N)."""
    if not isinstance(num_householder, int) or num_householder < 1:
        raise ValueError(f"num_householder must be a positive int, got {num_householder!r}")
    n = num_householder
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.dim() != 4 or tuple(k.shape) != (B, T * n, H, K):
        raise ValueError(
            f"k must be [B, T*num_householder, H, K] = {(B, T * n, H, K)} for q {tuple(q.shape)} and "
            f"num_householder={n}, got {tuple(k.shape)}"
        )
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T * n, H):
        raise ValueError(f"v must be [B, T*num_householder, H, V] = {(B, T * n, H)} + (V,), got {tuple(v.shape)}")
    V = v.shape[-1]
    if tuple(beta.shape) != (B, T * n, H):
        raise ValueError(f"beta must be [B, T*num_householder, H] = {(B, T * n, H)}, got {tuple(beta.shape)}")
    if g is not None and tuple(g.shape) != (B, T, H):
        raise ValueError(f"g must be [B, T, H] = {(B, T, H)} (one decay per token), got {tuple(g.shape)}")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs packed inputs with batch size 1, got B={B}; flatten the batch first")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor [N+1], got {tuple(cu_seqlens.shape)}")
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != T or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to T={T} (token offsets), got {offsets}")
        N = len(offsets) - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, H, K, V):
        raise ValueError(
            f"initial_state must be [N, H, K, V] = {(N, H, K, V)} (N = number of sequences), "
            f"got {tuple(initial_state.shape)}"
        )
    return B, T, H, K, V, N


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (tests); everything else accumulates in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Recurrence: the reference, and the decode path (T = 1)
# ----------------------------------------------------------------------------------------------


def _recurrent(q, k, v, beta, g, scale, h0, n):
    """One sequence batch, no cu_seqlens. Returns (o [B, T, H, V] compute dtype, S [B, H, K, V])."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = _compute_dtype(q)
    # time-major so that each step indexes a contiguous slice
    qs = (q.to(dt) * scale).transpose(0, 1)  # [T, B, H, K]
    ks = k.to(dt).reshape(B, T, n, H, K).permute(1, 2, 0, 3, 4)  # [T, n, B, H, K]
    vs = v.to(dt).reshape(B, T, n, H, V).permute(1, 2, 0, 3, 4)  # [T, n, B, H, V]
    bks = ks * beta.to(dt).reshape(B, T, n, H).permute(1, 2, 0, 3).unsqueeze(-1)  # [T, n, B, H, K], beta * k
    decay = g.to(dt).exp().transpose(0, 1)[..., None, None] if g is not None else None  # [T, B, H, 1, 1]
    S = h0.to(dt) if h0 is not None else q.new_zeros(B, H, K, V, dtype=dt)  # [B, H, K, V]
    outs = []
    for t in range(T):
        if decay is not None:
            S = S * decay[t]
        for j in range(n):
            pred = (ks[t, j].unsqueeze(-2) @ S).squeeze(-2)  # [B, H, V] = S^T k
            S = S + bks[t, j].unsqueeze(-1) * (vs[t, j] - pred).unsqueeze(-2)
        outs.append((qs[t].unsqueeze(-2) @ S).squeeze(-2))  # [B, H, V]
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, V, dtype=dt)  # [B, T, H, V]
    return o, S


def recurrent_delta_product(
    q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    num_householder=1,
):
    """Token-by-token DeltaProduct (see module docstring). Reference for the chunk kernel and decode path."""
    B, T, H, K, V, N = _check_inputs(q, k, v, beta, g, initial_state, cu_seqlens, num_householder)
    n = num_householder
    scale = K**-0.5 if scale is None else scale
    if cu_seqlens is None:
        o, S = _recurrent(q, k, v, beta, g, scale, initial_state, n)
        return o.to(q.dtype), (S if output_final_state else None)
    # packed sequences: run each one from its own initial state
    offsets = cu_seqlens.tolist()
    outs, finals = [], []
    for i, (s, e) in enumerate(zip(offsets, offsets[1:])):
        h0 = initial_state[i : i + 1] if initial_state is not None else None
        o_i, S_i = _recurrent(
            q[:, s:e], k[:, s * n : e * n], v[:, s * n : e * n], beta[:, s * n : e * n],
            None if g is None else g[:, s:e], scale, h0, n,
        )
        outs.append(o_i)
        finals.append(S_i)
    o = torch.cat(outs, dim=1).to(q.dtype)
    return o, (torch.cat(finals, dim=0) if output_final_state else None)


# ----------------------------------------------------------------------------------------------
# Chunk-parallel form
# ----------------------------------------------------------------------------------------------
# The n_h Householder steps of a token are n_h delta-rule steps on an interleaved sequence of
# length L = T*n_h. A chunk holds Ct whole tokens, i.e. C = Ct*n_h interleaved positions. Inside a
# chunk, with decays gamma_p (cumulative log decay up to position p; a token's decay sits on its
# first position) and state S0 at the chunk start, the WY form gives
#     Tm = (I + tril(diag(beta) K K^T * exp(gamma_i - gamma_j), -1))^-1   one triangular solve against I
#     U = Tm beta V,  W = Tm beta exp(gamma) K                             two matmuls
#     Vn = U - W S0                              what the delta rule writes at each position
#     S1 = exp(gamma_last) S0 + Kd^T Vn          Kd = exp(gamma_last - gamma) K
#     o  = Qd S0 + Aq Vn                         Qd = exp(gamma_q) Q, Aq = Q K^T * exp(gamma_q - gamma), masked
# where the query of a token reads every position of its own token (the state after its n_h steps).
# Everything but Vn and S1 is computed for all chunks at once; those two run chunk by chunk.
# (Folding the scan into S1 = M S0 + B with precomputed K x K matrices M was measured: ~5% slower,
# more flops.)


def _baddbmm(input, b1, b2, beta=1.0, alpha=1.0, out=None):
    """torch.baddbmm over any number of leading batch dims ([NC, BH, ...] here); flattening them is a view."""
    flat = lambda t: t.flatten(0, -3) if t.dim() > 3 else t
    result = torch.baddbmm(flat(input), flat(b1), flat(b2), beta=beta, alpha=alpha,
                           out=flat(out) if out is not None else None)
    return result.view(*b1.shape[:-1], b2.shape[-1])


def _times_token_rows(M, q_decay, n, in_place=False):
    """M [.., C, C] times q_decay [.., Ct, C] repeated to the n_h rows of each token, without the repeated copy."""
    rows = M.unflatten(-2, (-1, n)) if n > 1 else M
    decay = q_decay.unsqueeze(-2) if n > 1 else q_decay
    out = rows.mul_(decay) if in_place else rows * decay
    return out.flatten(-3, -2) if n > 1 else out


def _intra_chunk(q, k, v, beta, g, n):
    """Everything inside a chunk that does not depend on the state carried into it, for all chunks at once.

    Shapes as in _chunk_scan, with B and H merged: q [NC, BH, Ct, K]; k [NC, BH, C, K]; v [NC, BH, C, V];
    beta [NC, BH, C]; g [NC, BH, Ct] or None. Returns a dict of the chunk quantities named in the comment
    above (the backward reads the decays and right-hand sides too).
    """
    Ct, C = q.shape[-2], k.shape[-2]
    dev = q.device
    # query of token i reads the state after all n_h steps of token i: positions j with j // n <= i
    sees = (torch.arange(C, device=dev)[None, :] // n) <= torch.arange(Ct, device=dev)[:, None]  # [Ct, C]
    x = {"kb": k * beta.unsqueeze(-1), "rv": v * beta.unsqueeze(-1)}  # beta_i k_i, beta_i v_i
    # the matmul results are scaled in place where no autograd graph is recorded (the recompute path): autograd
    # would keep a copy of each original, which the path without recompute must not add to its saved bytes
    in_place = not torch.is_grad_enabled()
    kt = k.transpose(-1, -2)
    # solve_triangular(upper=False, unitriangular=True) reads only the strictly lower triangle, so A's
    # upper triangle and diagonal need no masking (and get no gradient)
    A = x["kb"] @ kt  # [NC, BH, C, C]  beta_i k_i . k_j
    Aq = q @ kt  # [NC, BH, Ct, C]
    if g is not None:
        gq = g.cumsum(-1)  # [NC, BH, Ct] log decay from the chunk start up to token i
        gk = gq.repeat_interleave(n, dim=-1) if n > 1 else gq  # [NC, BH, C] same for a token's n_h positions
        glast = gq[..., -1:]  # [NC, BH, 1]
        # differences of cumulative sums are <= 0 where unmasked; mask to -inf before exp so nothing overflows
        x["q_decay"] = (gq.unsqueeze(-1) - gk.unsqueeze(-2)).masked_fill_(~sees, float("-inf")).exp_()  # [Ct, C]
        A = _times_token_rows(A, x["q_decay"], n, in_place=in_place)  # row i of A decays like token i // n
        Aq = Aq.mul_(x["q_decay"]) if in_place else Aq * x["q_decay"]
        x["exp_gk"], x["exp_gq"] = gk.exp().unsqueeze(-1), gq.exp().unsqueeze(-1)  # [.., C, 1], [.., Ct, 1]
        x["exp_rest"] = (glast - gk).exp().unsqueeze(-1)  # [.., C, 1] decay from position j to the chunk end
        x["rk"] = x["kb"] * x["exp_gk"]
        x["qd"], x["kd"] = q * x["exp_gq"], k * x["exp_rest"]
        x["chunk_decay"] = glast.exp().unsqueeze(-1)  # [NC, BH, 1, 1]
    else:
        Aq = Aq.masked_fill_(~sees, 0.0) if in_place else Aq.masked_fill(~sees, 0.0)
        x["rk"], x["qd"], x["kd"], x["chunk_decay"] = x["kb"], q, k, None
    x["sees"], x["A"], x["Aq"] = sees, A, Aq
    # Tm = (I + tril(A, -1))^-1 by a unit lower-triangular solve, then U = Tm beta V, W = Tm beta exp(gamma) K.
    # Solving for the C x C inverse and two matmuls beat one solve with the V + K right-hand sides on CPU
    # (~10% per call: the solve runs far below matmul speed), and need no concatenated right-hand side.
    eye = torch.eye(C, dtype=A.dtype, device=dev).expand_as(A)
    x["Tm"] = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)  # [NC, BH, C, C]
    x["U"], x["W"] = x["Tm"] @ x["rv"], x["Tm"] @ x["rk"]  # [NC, BH, C, V], [NC, BH, C, K]
    return x


def _state_scan(x, S0, resets, captures):
    """The sequential part: chunk by chunk, what the delta rule writes (Vn) and the state entering each chunk.

    S0 [BH, K, V]; resets {chunk: state [BH, K, V]} replace the carried state at document starts; captures
    {chunk: key} record the state after that chunk. Returns (S_starts [NC, BH, K, V], Vn [NC, BH, C, V],
    {key: state}, state after the last chunk). Without autograd each chunk writes straight into its slot of the
    two outputs; autograd (the path without _RECOMPUTE_IN_BACKWARD) cannot record out= writes, so it stacks.
    """
    U, W, kdt, dec = x["U"], x["W"], x["kd"].transpose(-1, -2), x["chunk_decay"]
    if torch.is_grad_enabled():
        S, starts, news, finals = S0, [], [], {}
        for c in range(len(U)):
            S = resets.get(c, S)
            starts.append(S)
            news.append(torch.baddbmm(U[c], W[c], S, alpha=-1.0))
            S = torch.baddbmm(S * dec[c] if dec is not None else S, kdt[c], news[c])
            if c in captures:
                finals[captures[c]] = S
        return torch.stack(starts), torch.stack(news), finals, S
    NC, BH, C, V = U.shape
    K = W.shape[-1]
    states = U.new_empty(NC + 1, BH, K, V)  # states[c]: entering chunk c; states[NC]: after the last one
    news = torch.empty_like(U)  # [NC, BH, C, V]
    states[0] = S0
    finals = {}
    for c in range(NC):
        if c in resets:
            states[c] = resets[c]
        torch.baddbmm(U[c], W[c], states[c], alpha=-1.0, out=news[c])  # [BH, C, V] what the delta rule writes
        if dec is not None:
            torch.mul(states[c], dec[c], out=states[c + 1])
            states[c + 1].baddbmm_(kdt[c], news[c])
        else:
            torch.baddbmm(states[c], kdt[c], news[c], out=states[c + 1])
        if c in captures:
            # a copy: a later reset may overwrite this slot, and the caller keeps it past this block
            finals[captures[c]] = states[c + 1].clone()
    return states[:NC], news, finals, states[NC].clone()  # a copy: a view would keep the whole buffer alive


# Blocks on CPU in fp32 run through the fused kernel (delta_product_cpu.cpp) when it builds: the same math per
# (chunk, head), its tiles kept in cache through every step. False: always the torch ops (tests, benchmarks).
_FUSED_CPU = True


def _fused(q, k, resets, captures, inputs) -> bool:
    """Whether this block takes the fused CPU kernel: it has no autograd graph to record (inputs needing grad under
    grad mode take the torch ops, which autograd can follow) and delta_product_cpu.qualifies."""
    if not _FUSED_CPU or delta_product_cpu is None:
        return False
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        return False
    return delta_product_cpu.qualifies(q, k, resets, captures)


def _fused_layout(x) -> bool:
    """Whether chunk_delta_product hands the blocks token-major views (see _to_chunks): where the fused kernel runs."""
    return (_FUSED_CPU and delta_product_cpu is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and delta_product_cpu.library() is not None)


def _merge_heads(q, k, v, beta, g):
    """[NC, B, H, ...] -> [NC, B*H, ...] (views where _to_chunks made q, k, v contiguous)."""
    return [x.flatten(1, 2) if x is not None else None for x in (q, k, v, beta, g)]


def _chunk_scan(q, k, v, beta, g, n, S0, resets, captures, out=None):
    """Chunk math on pre-chunked, chunk-major inputs.

    q [NC, B, H, Ct, K] (already scaled); k [NC, B, H, C, K]; v [NC, B, H, C, V]; beta [NC, B, H, C];
    g [NC, B, H, Ct] or None. S0: state entering chunk 0 [B, H, K, V]. resets: {chunk: state} replaces
    the carried state at document starts; captures: {chunk: key} records the state after that chunk.
    Returns (o [NC, B, H, Ct, V], {key: state [B, H, K, V]}, state after the last chunk [B, H, K, V]);
    o is written into `out` (contiguous, o's shape) when given.
    """
    if _fused(q, k, resets, captures, (q, k, v, beta, g, S0)):
        o, S = delta_product_cpu.block_forward(q, k, v, beta, g, n, S0, out)
        return o, {key: S for key in captures.values()}, S
    NC, B, H, Ct, K = q.shape
    V = v.shape[-1]
    x = _intra_chunk(*_merge_heads(q, k, v, beta, g), n)
    merged = lambda S: S.reshape(B * H, K, V)
    S_starts, Vn, finals, S = _state_scan(
        x, merged(S0), {c: merged(s) for c, s in resets.items()}, captures)
    direct = out is not None and out.is_contiguous()  # a strided `out` (the fused layout) gets a copy
    o = torch.baddbmm(torch.bmm(x["Aq"].flatten(0, 1), Vn.flatten(0, 1)), x["qd"].flatten(0, 1),
                      S_starts.flatten(0, 1), out=out.flatten(0, 2) if direct else None).view(NC, B, H, Ct, V)
    if out is not None and not direct:
        o = out.copy_(o)
    unmerged = lambda S: S.view(B, H, K, V)
    return o, {key: unmerged(s) for key, s in finals.items()}, unmerged(S)


def _chunk_scan_backward(q, k, v, beta, g, n, S0, resets, d_o, d_S_last, d_captured, out):
    """Gradients of _chunk_scan, written out (no autograd): one block's intermediates are recomputed from
    its inputs and entry state, then the state gradient runs back chunk by chunk and the rest is batched.

    d_o [NC, B, H, Ct, V]; d_S_last: gradient of the state after the last chunk [B, H, K, V]; d_captured
    {chunk: gradient of that captured state}. The gradients of q, k, v, beta and g are written into `out`,
    contiguous tensors in the inputs' shapes (this block's slice of the whole gradient, so that no
    concatenation follows; None for g=None). Returns (dS0, {chunk: d reset}).
    """
    if _fused(q, k, resets, d_captured, ()):
        d_last = d_S_last + sum(d_captured.values()) if d_captured else d_S_last  # captured: after the last chunk
        return delta_product_cpu.block_backward(q, k, v, beta, g, n, S0, d_o, d_last, out), {}
    if any(t is not None and not t.is_contiguous() for t in out):  # strided gradients (the fused layout): via copies
        staged = [torch.empty(t.shape, dtype=t.dtype, device=t.device) if t is not None else None for t in out]
        dS, d_resets = _chunk_scan_backward(q, k, v, beta, g, n, S0, resets, d_o, d_S_last, d_captured, staged)
        for t, s in zip(out, staged):
            if t is not None:
                t.copy_(s)
        return dS, d_resets
    NC, B, H, Ct, K = q.shape
    V = v.shape[-1]
    merged = lambda S: S.reshape(B * H, K, V)
    q, k, v, beta, g = _merge_heads(q, k, v, beta, g)
    dO = d_o.flatten(1, 2)  # [NC, BH, Ct, V]
    x = _intra_chunk(q, k, v, beta, g, n)
    S_starts, Vn, _, _ = _state_scan(x, merged(S0), {c: merged(s) for c, s in resets.items()}, {})
    Aq, W, kd, Tm, dec = x["Aq"], x["W"], x["kd"], x["Tm"], x["chunk_decay"]

    # state gradient, last chunk first: o = Qd S0 + Aq Vn, Vn = U - W S0, S1 = decay S0 + Kd^T Vn
    dVn = Aq.transpose(-1, -2) @ dO  # [NC, BH, C, V], the o part; the S1 part is added in the loop
    # dS[c]: gradient of the state entering chunk c, so dS[c + 1] is that of the state after it. It starts as
    # the o part and each chunk adds the rest in place: three ops per chunk, no copies
    dS = S_starts.new_empty(NC + 1, *S_starts.shape[1:])  # [NC + 1, BH, K, V]
    _baddbmm(dS[:NC], x["qd"].transpose(-1, -2), dO, beta=0.0, out=dS[:NC])
    dS[NC] = merged(d_S_last)
    d_resets = {}
    for c in reversed(range(NC)):
        if c in d_captured:
            dS[c + 1] += merged(d_captured[c])
        dVn[c].baddbmm_(kd[c], dS[c + 1])
        dS[c].baddbmm_(W[c].transpose(-1, -2), dVn[c], alpha=-1.0)
        dS[c].addcmul_(dS[c + 1], dec[c]) if dec is not None else dS[c].add_(dS[c + 1])
        if c in resets:  # the state entering this chunk was the reset state, not the carried one
            d_resets[c] = dS[c].clone().view(B, H, K, V)
            dS[c].zero_()
    dS1, dS = dS[1:], dS[0].clone()  # after each chunk; entering the block (returned: a copy, not a view)

    # everything else, all chunks at once
    # baddbmm with beta=0 ignores its (uninitialised) input: a product and its sign in one pass
    dW = _baddbmm(torch.empty_like(W), dVn, S_starts.transpose(-1, -2), beta=0.0, alpha=-1.0)  # [NC, BH, C, K]
    dAq = dO @ Vn.transpose(-1, -2)  # [NC, BH, Ct, C]
    dqd = dO @ S_starts.transpose(-1, -2)  # [NC, BH, Ct, K]
    dkd = Vn @ dS1.transpose(-1, -2)  # [NC, BH, C, K]
    Tmt = Tm.transpose(-1, -2)
    drv, drk = Tmt @ dVn, Tmt @ dW  # U = Tm rv, W = Tm rk
    # Tm = (I + L)^-1, L the strictly lower part of A: dL = -Tm^T dTm Tm^T with dTm = dU rv^T + dW rk^T,
    # which is -(drv U^T + drk W^T): two matmuls instead of four
    dA = _baddbmm(drv @ x["U"].transpose(-1, -2), drk, W.transpose(-1, -2), beta=-1.0, alpha=-1.0).tril_(-1)
    if g is not None:
        dE, dAq_raw = _times_token_rows(dA, x["q_decay"], n), dAq * x["q_decay"]
    else:
        dE, dAq_raw = dA, dAq.masked_fill(~x["sees"], 0.0)
    kb = x["kb"]
    dq, dk, dv, dbeta, dg = (t.flatten(1, 2) if t is not None else None for t in out)  # views, B and H merged
    # the sums below accumulate into the first term's buffer (baddbmm out=, addcmul_): no pass per addition
    dkb = _baddbmm(drk * x["exp_gk"] if g is not None else drk, dE, k)
    _baddbmm(dkb * beta.unsqueeze(-1), dE.transpose(-1, -2), kb, out=dk)
    _baddbmm(dk, dAq_raw.transpose(-1, -2), q, out=dk)
    dk.addcmul_(dkd, x["exp_rest"]) if g is not None else dk.add_(dkd)
    _baddbmm(dqd * x["exp_gq"] if g is not None else dqd, dAq_raw, k, out=dq)
    torch.mul(drv, beta.unsqueeze(-1), out=dv)
    torch.add((drv * v).sum(-1), (dkb * k).sum(-1), out=dbeta)
    if g is not None:
        # log-space decays: each factor exp(a - b) passes (gradient * value) to a and minus that to b
        Mq, Ma = dAq * Aq, dA * x["A"]
        to_end = (dkd * kd).sum(-1)  # [NC, BH, C]
        dgk = Ma.sum(-1) - Ma.sum(-2) - Mq.sum(-2) + (drk * x["rk"]).sum(-1) - to_end
        dgq = Mq.sum(-1) + (dqd * x["qd"]).sum(-1) + dgk.view(NC, B * H, Ct, n).sum(-1)
        dglast = to_end.sum(-1) + (dS1 * S_starts).sum((-1, -2)) * dec.view(NC, B * H)
        dgq[..., -1] += dglast
        dg.copy_(dgq.flip(-1).cumsum(-1).flip(-1))  # gq = cumsum(g)
    return dS.view(B, H, K, V), d_resets


# On CPU, chunks are processed in blocks whose intermediates fit in cache: one pass over the whole
# sequence per elementwise op falls out of cache at long T and made time grow faster than T.
# Measured on a 2-core EPYC (benchmarks/bench_delta_product.py); a GPU takes all chunks at once.
_CPU_BLOCK_ELEMENTS = 1 << 20

# Backward recomputes each block of chunks from its saved entry state (_RecomputedScan) instead of keeping
# every intermediate of the forward. False restores autograd through the whole forward (the old path,
# kept for benchmarks/bench_delta_product_memory.py and the equality tests).
_RECOMPUTE_IN_BACKWARD = True


def _block_size(chunks) -> int:
    """Chunks per block: all of them on a GPU, as many as fit in cache on CPU."""
    NC, B, H, C, K = chunks[1].shape
    V = chunks[2].shape[-1]
    per_chunk = B * H * C * (C + 2 * (K + V))  # rough size of one chunk's intermediates
    return NC if chunks[0].is_cuda else max(1, min(NC, _CPU_BLOCK_ELEMENTS // per_chunk))


def _split_blocks(chunks, block):
    """Per block, the tuple of chunk tensors (None stays None). split, not slicing: one backward node."""
    NC = chunks[0].shape[0]
    return list(zip(*(x.split(block, dim=0) if x is not None else [None] * -(-NC // block) for x in chunks)))


def _local(mapping, lo, hi):
    """{chunk: x} restricted to chunks lo..hi-1, renumbered from the block start."""
    return {c - lo: x for c, x in mapping.items() if lo <= c < hi}


def _blocked_scan(chunks, n, S0, resets, captures):
    """_chunk_scan over blocks of chunks, the state carried from block to block."""
    block = _block_size(chunks)
    outs, finals, S = [], {}, S0
    for i, piece in enumerate(_split_blocks(chunks, block)):
        lo, hi = i * block, (i + 1) * block
        o, f, S = _chunk_scan(*piece, n, S, _local(resets, lo, hi), _local(captures, lo, hi))
        outs.append(o)
        finals.update(f)
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0], finals


def _chunk_output(q, V):
    """o [NC, B, H, Ct, V] for chunk tensors like q: contiguous, or, when q is a view of token-major memory (the
    fused kernel's layout), a view of token-major memory too, so that _from_chunks needs no copy."""
    NC, B, H, Ct, _ = q.shape
    if q.is_contiguous():
        return q.new_empty(NC, B, H, Ct, V)
    return q.new_empty(B, NC, Ct, H, V).permute(1, 0, 3, 2, 4)


class _RecomputedScan(torch.autograd.Function):
    """_blocked_scan that saves only its inputs and the state entering each block of chunks.

    Backward walks the blocks in reverse: _chunk_scan_backward recomputes one block's intermediates from its
    saved entry state (no autograd graph) and writes out their gradients, and the gradient of the entry state
    goes to the previous block. The price is one more forward without its output, and one block's
    intermediates alive at a time in backward. Written out rather than autograd through the recomputed block:
    forward + backward 1.15-1.25x faster on a 2-core Xeon (benchmarks/profile_delta_product.py --compare).

    Inputs: the chunk tensors q, k, v, beta, g (g may be None), S0 and the reset states (document starts,
    in the order of reset_chunks). Outputs: o, then the states after each chunk of capture_chunks.
    """

    @staticmethod
    def forward(ctx, n, reset_chunks, capture_chunks, q, k, v, beta, g, S0, *reset_states):
        chunks = (q, k, v, beta, g)
        block = _block_size(chunks)
        resets = dict(zip(reset_chunks, reset_states))
        captures = {c: i for i, c in enumerate(capture_chunks)}
        NC, B, H, Ct, _ = q.shape
        o = _chunk_output(q, v.shape[-1])  # each block writes its slice: no concatenation
        finals, entry_states, S = {}, [], S0
        for i, (piece, o_piece) in enumerate(zip(_split_blocks(chunks, block), o.split(block, dim=0))):
            lo, hi = i * block, (i + 1) * block
            entry_states.append(S)
            _, f, S = _chunk_scan(*piece, n, S, _local(resets, lo, hi), _local(captures, lo, hi), out=o_piece)
            finals.update(f)
        ctx.n, ctx.block, ctx.reset_chunks, ctx.capture_chunks = n, block, reset_chunks, capture_chunks
        ctx.has_g = g is not None
        # g=None cannot be saved; an empty tensor stands in for it
        ctx.save_for_backward(q, k, v, beta, g if g is not None else q.new_empty(0), torch.stack(entry_states),
                              *reset_states)
        return (o, *(finals[i] for i in range(len(capture_chunks))))

    @staticmethod
    def backward(ctx, d_o, *d_captured):
        q, k, v, beta, g, entry_states, *reset_states = ctx.saved_tensors
        g = g if ctx.has_g else None
        block = ctx.block
        pieces = _split_blocks((q, k, v, beta, g), block)
        d_o_pieces = d_o.split(block, dim=0)
        # each block writes its slice of the whole gradients (in the inputs' shapes and strides)
        grads = [torch.empty_like(x) if x is not None else None  # the inputs' strides (_to_chunks)
                 for x in (q, k, v, beta, g)]
        grad_pieces = _split_blocks(grads, block)
        d_resets = [None] * len(reset_states)
        dS = torch.zeros_like(entry_states[0])  # nothing reads the state after the last chunk
        for i in reversed(range(len(pieces))):
            lo, hi = i * block, (i + 1) * block
            resets = {c - lo: j for j, c in enumerate(ctx.reset_chunks) if lo <= c < hi}
            captured = {c - lo: d_captured[j] for j, c in enumerate(ctx.capture_chunks)
                        if lo <= c < hi and d_captured[j] is not None}
            dS, d_local_resets = _chunk_scan_backward(
                *pieces[i], ctx.n, entry_states[i], {c: reset_states[j] for c, j in resets.items()},
                d_o_pieces[i], dS, captured, grad_pieces[i])
            for c, j in resets.items():
                d_resets[j] = d_local_resets[c]
        return (None, None, None, *grads, dS, *d_resets)


def _scan(chunks, n, S0, resets, captures):
    """_blocked_scan, through _RecomputedScan when a gradient is wanted (see _RECOMPUTE_IN_BACKWARD)."""
    tensors = [x for x in chunks if x is not None] + [S0] + list(resets.values())
    if not (_RECOMPUTE_IN_BACKWARD and torch.is_grad_enabled() and any(x.requires_grad for x in tensors)):
        return _blocked_scan(chunks, n, S0, resets, captures)
    reset_chunks, capture_chunks = sorted(resets), sorted(captures)
    o, *states = _RecomputedScan.apply(n, reset_chunks, capture_chunks, *chunks, S0,
                                       *(resets[c] for c in reset_chunks))
    return o, {captures[c]: S for c, S in zip(capture_chunks, states)}


def _to_chunks(qf, kf, vf, bf, gf, Ct, n, copy=True):
    """Token-major padded tensors -> chunk-major [NC, B, H, ...] (see _chunk_scan for the shapes). copy=False keeps
    q, k, v as views of the token-major memory, for the fused CPU kernel, which reads any strides: without the
    copies and their gradients' copies back it is 4-7% faster at T = 4096, n_h 2-3."""
    B, Tp, H, K = qf.shape
    V = vf.shape[-1]
    NC = Tp // Ct
    layout = (lambda x: x.contiguous()) if copy else (lambda x: x)
    q = layout(qf.reshape(B, NC, Ct, H, K).permute(1, 0, 3, 2, 4))  # [NC, B, H, Ct, K]
    k = layout(kf.reshape(B, NC, Ct * n, H, K).permute(1, 0, 3, 2, 4))  # [NC, B, H, C, K] interleaved
    v = layout(vf.reshape(B, NC, Ct * n, H, V).permute(1, 0, 3, 2, 4))  # [NC, B, H, C, V]
    b = bf.reshape(B, NC, Ct * n, H).permute(1, 0, 3, 2)  # [NC, B, H, C]
    g = gf.reshape(B, NC, Ct, H).permute(1, 0, 3, 2) if gf is not None else None  # [NC, B, H, Ct]
    return q, k, v, b, g


def _from_chunks(o, Ct):
    """[NC, B, H, Ct, V] -> token-major [B, NC*Ct, H, V]."""
    NC, B, H, _, V = o.shape
    return o.permute(1, 0, 3, 2, 4).reshape(B, NC * Ct, H, V)


def _varlen_layout(offsets, Ct, device):
    """Pad every packed sequence to whole chunks so that no chunk spans two documents.

    Returns (src [P] token index or -1 for padding, dest [T] padded position of each token,
    doc_chunks [(first_chunk, last_chunk) or None per document]).
    """
    src, dest, doc_chunks, P = [], [], [], 0
    for s, e in zip(offsets, offsets[1:]):
        L = e - s
        Lp = -(-L // Ct) * Ct
        src.extend(range(s, e))
        src.extend([-1] * (Lp - L))
        dest.extend(range(P, P + L))
        doc_chunks.append((P // Ct, (P + Lp) // Ct - 1) if L > 0 else None)
        P += Lp
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    return as_long(src), as_long(dest), doc_chunks


def _gather_tokens(x, src):
    """x [1, T, ...] -> [1, P, ...] with x[:, src], zeros where src == -1."""
    T = x.shape[1]
    x = torch.cat([x, x.new_zeros(1, 1, *x.shape[2:])], dim=1)
    return x.index_select(1, torch.where(src < 0, T, src))


def _fla_backend(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, n):
    """flash-linear-attention's Triton kernel (CUDA, bf16/fp16), same convention. Checked against the torch
    path with fla 0.6.0 on an H100; g=None takes fla's ungated path, which older fla releases lack."""
    o, S = _fla_chunk_gated_delta_product(
        q=q, k=k, v=v, g=g, beta=beta, num_householder=n, scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )
    return o.to(q.dtype), (S.float() if S is not None else None)


def _fla_gated_backward_refused(q, g) -> bool:
    """fla 0.6 refuses its gated backward on Hopper with Triton 3.4 <= version < 3.7.1 (wrong results there;
    measured on an H100 with Triton 3.6). "auto" then trains on the torch path instead of failing in backward."""
    if g is None or not torch.is_grad_enabled() or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    try:
        import triton
    except ImportError:
        return False
    version = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:3] if p.isdigit())
    return (3, 4, 0) <= version < (3, 7, 1)


def _use_fla(backend, q, g=None):
    if backend not in ("auto", "torch", "fla"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'fla', got {backend!r}")
    fla_ok = _fla_chunk_gated_delta_product is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    if backend == "fla" and not fla_ok:
        raise ValueError("backend='fla' needs flash-linear-attention installed and bf16/fp16 CUDA inputs")
    return backend == "fla" or (backend == "auto" and fla_ok and not _fla_gated_backward_refused(q, g))


def chunk_delta_product(
    q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    num_householder=1, chunk_size=64, backend="auto",
):
    """Chunk-parallel DeltaProduct, same result as ``recurrent_delta_product``.

    ``chunk_size`` counts interleaved positions (tokens * num_householder); a chunk holds
    ``max(1, chunk_size // num_householder)`` whole tokens. ``backend``: "torch" (this file),
    "fla" (flash-linear-attention, CUDA bf16/fp16) or "auto" (fla when it applies, else torch).
    """
    B, T, H, K, V, N = _check_inputs(q, k, v, beta, g, initial_state, cu_seqlens, num_householder)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    n = num_householder
    scale = K**-0.5 if scale is None else scale
    if _use_fla(backend, q, g):
        return _fla_backend(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, n)

    dt = _compute_dtype(q)
    Ct = max(1, chunk_size // n)  # whole tokens per chunk
    h0 = initial_state.to(dt) if initial_state is not None else None
    if T == 0:
        S = h0 if h0 is not None else q.new_zeros(N, H, K, V, dtype=dt)
        return q.new_zeros(B, 0, H, V), (S if output_final_state else None)

    # token-major views, the n_h keys of a token side by side
    qf = q.to(dt) * scale  # [B, T, H, K]
    kf = k.to(dt).reshape(B, T, n, H, K)
    vf = v.to(dt).reshape(B, T, n, H, V)
    bf = beta.to(dt).reshape(B, T, n, H)
    gf = g.to(dt) if g is not None else None  # [B, T, H]

    if cu_seqlens is None:
        # pad with k = v = beta = g = 0: identity steps, so the final state is unaffected
        pad = (-T) % Ct
        if pad:
            qf, kf, vf, bf = (torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], dim=1) for x in (qf, kf, vf, bf))
            gf = torch.cat([gf, gf.new_zeros(B, pad, H)], dim=1) if gf is not None else None
        chunks = _to_chunks(qf, kf, vf, bf, gf, Ct, n, copy=not _fused_layout(qf))
        NC = chunks[0].shape[0]
        S0 = h0 if h0 is not None else q.new_zeros(B, H, K, V, dtype=dt)
        o, finals = _scan(chunks, n, S0, resets={}, captures={NC - 1: "all"})
        o = _from_chunks(o, Ct)[:, :T]  # [B, T, H, V]
        S = finals["all"]
    else:
        # packed documents: pad each to whole chunks, reset the state at each document's first chunk
        src, dest, doc_chunks = _varlen_layout(cu_seqlens.tolist(), Ct, q.device)
        qf, kf, vf, bf = (_gather_tokens(x, src) for x in (qf, kf, vf, bf))
        gf = _gather_tokens(gf, src) if gf is not None else None
        chunks = _to_chunks(qf, kf, vf, bf, gf, Ct, n, copy=not _fused_layout(qf))
        zeros = q.new_zeros(1, H, K, V, dtype=dt)
        resets, captures = {}, {}
        for i, span in enumerate(doc_chunks):
            if span is not None:
                resets[span[0]] = h0[i : i + 1] if h0 is not None else zeros
                captures[span[1]] = i
        o, finals = _scan(chunks, n, zeros, resets, captures)
        o = _from_chunks(o, Ct).index_select(1, dest)  # [1, T, H, V]
        # an empty document passes its initial state through
        S = torch.cat(
            [finals[i] if i in finals else (h0[i : i + 1] if h0 is not None else zeros) for i in range(N)], dim=0
        )
    return o.to(q.dtype), (S if output_final_state else None)
