"""benchmarks/gpu_check.sh without a GPU: it parses, --dry-run prints every command and runs none, the three
`seedlm train` commands it prints are valid run configs, and its summary reads the trainer's metrics."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

from seedlm.launch.cli import main as seedlm

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def test_script_parses_and_dry_run_prints_the_commands_without_running_them(tmp_path, capsys):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    out = tmp_path / "gpu"
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--steps", "7"],
                          capture_output=True, text=True, check=True)
    commands = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
    assert not out.exists()  # nothing ran
    assert any("pip install torch" in c for c in commands) and not any("flash-attn" in c for c in commands)
    assert any("check_cuda_paths.py" in c for c in commands)
    train = [c for c in commands if "seedlm.launch.cli train" in c]
    assert len(train) == 3
    for command, name in zip(train, ["dense", "moe", "deltaproduct"]):
        args = shlex.split(command.split("seedlm.launch.cli train ", 1)[1].split(" 2>&1")[0])
        for key in ("train.dtype=bf16", "zero_stage=1", "train.compile=true", "max_steps=7",
                    "train.attn_implementation=varlen_attention", f"output_dir={out}/{name}"):
            assert key in args, (name, key)
        # every key the script passes exists: the trainer's own config check, before any compute
        args = [a for a in args if not a.startswith("tokenizer.path=")]  # written by the first run
        assert seedlm(["train", *args, "--print-config"]) == 0, name
    capsys.readouterr()
    assert commands[-1].startswith("python benchmarks/gpu_check_summary.py")


def test_summary_reads_tokens_per_sec_mfu_and_the_kernel_choice(tmp_path):
    for name, tps in [("dense", 1000.0), ("deltaproduct", 900.0)]:
        (tmp_path / name).mkdir()
        rows = [{"step": s, "loss": 5.0 - s / 10, "tokens_per_sec": 10.0 if s <= 3 else tps, "mfu": 0.4}
                for s in range(1, 7)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "deltaproduct.log").write_text(
        "INFO DeltaProduct kernel for H=16 K=128 V=128 n_h=2 gated=True: torch (fla is not installed)\n")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check_summary.py"), str(tmp_path),
                           "dense", "moe", "deltaproduct"], capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert "| dense | 6 | 1,000 | 40.0% | 4.400 | MFU >= 45% |  |" in lines  # the 3 compile steps left out
    assert any(line.startswith("| moe | 0 | did not finish") for line in lines)
    assert any("| deltaproduct | 6 | 900 |" in line and "torch (fla is not installed)" in line for line in lines)
    assert "DeltaProduct / dense tokens/s: 0.90x" in lines
