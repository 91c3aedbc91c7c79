"""Each benchmark's --smoke mode runs and prints its table (never a time assertion: speed lives in benchmarks/)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script, expected",
    [
        ("bench_gated_moe.py", "| seedlm gate=elementwise |"),
        ("bench_delta_product.py", "| n_h | T | chunk (ms) |"),
        ("bench_data_pipeline.py", "| pipeline (tokenise + pack) | tokens/s |"),
        ("bench_trainer.py", "| ZeRO stage | parameters |"),
    ],
)
def test_benchmark_smoke_mode_prints_its_table(script, expected):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout


def test_cuda_check_says_it_needs_a_gpu_here():
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/check_cuda_paths.py itself")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "check_cuda_paths.py")], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 1 and "no CUDA device" in result.stdout
