"""Theoretical floors for the benchmarks: this machine's fp32 matmul peak and each workload's FLOPs.

floor (ms) = FLOPs / peak: the time the workload would take if every FLOP ran at the speed of one large
fp32 matmul on this machine. Measured time / floor says how far a path is from the hardware limit; the
FLOP counts below are the algorithms' matmul FLOPs (elementwise work, softmax, norms are left out, so the
floor is a lower bound). Forward + backward counts 3x the forward: the backward of a matmul is two
matmuls of the same size (input gradient and weight gradient).
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

import torch


def matmul_peak_flops(size: int = 2048, rounds: int = 3) -> float:
    """fp32 FLOP/s of torch.matmul on [size, size] @ [size, size] with the current torch threads.

    Best of `rounds` measurements of 5 matmuls each (launch.metrics.measure_peak_flops, the trainer's MFU
    denominator): other processes on the machine can only slow a round down, never speed it up.
    """
    from seedlm.launch.metrics import measure_peak_flops

    return max(measure_peak_flops(torch.device("cpu"), torch.float32, size=size) for _ in range(rounds))


def training_step_flops(config, batch: int, seq_len: int) -> float:
    """Forward + backward FLOPs of one training step of a model built from `config` on [batch, seq_len].

    The config's flops_per_token: 6 x active non-embedding parameters (attention projections, the
    router, the top-k experts each token runs; the LM head) plus the causal attention score and value
    matmuls (12 x layers x heads x head_dim x seq_len / 2 per token). The optimizer step is not counted.
    """
    return config.flops_per_token(seq_len) * batch * seq_len


def chunk_delta_product_flops(T: int, n_h: int, H: int, K: int, V: int, chunk_size: int, B: int = 1) -> float:
    """Forward + backward FLOPs of model/delta_product_kernels.py's chunk_delta_product (torch path).

    A chunk holds Ct = chunk_size // n_h tokens, C = Ct * n_h interleaved Householder positions; per chunk
    and head the forward does these matmuls (see _chunk_scan; keep this count in step with that code):
      A  = (beta K) K^T              2 C C K
      Aq = Q K^T                     2 Ct C K
      Tm = (I + tril(A))^-1          C C C       unit lower-triangular solve against the C x C identity
      U, W = Tm [beta V | ...K]      2 C C (V + K)
      Vn = U - W S0                  2 C K V
      S1 = decay S0 + Kd^T Vn        2 K C V
      o  = Aq Vn + Qd S0             2 Ct C V + 2 Ct K V
    The solve's backward is another solve and a triangular product, about 2x its forward like the matmuls',
    so forward + backward is counted as 3x.
    """
    Ct = max(1, chunk_size // n_h)
    C = Ct * n_h
    chunks = -(-T // Ct)  # the last chunk is padded to Ct tokens
    per_chunk = (2 * C * C * K + 2 * Ct * C * K + C**3 + 2 * C * C * (V + K) + 4 * C * K * V + 2 * Ct * C * V
                 + 2 * Ct * K * V)
    return 3.0 * B * H * chunks * per_chunk


def causal_attention_flops(T: int, H: int, head_dim: int, B: int = 1) -> float:
    """Forward + backward FLOPs of causal softmax attention: Q K^T and P V are 2 T T d each per head, half
    of each under the causal mask, so 2 T T d H forward and 3x that with the backward."""
    return 3.0 * 2 * B * H * T * T * head_dim


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary(peak_flops: float, size: int = 2048) -> str:
    """One line: CPU, cores, torch threads, torch version, the measured matmul peak, load and date."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"fp32 matmul peak {peak_flops / 1e9:.0f} GFLOP/s ({size}^3 matmuls, best of 3); "
        f"load average {load} at the start; {date}"
    )
