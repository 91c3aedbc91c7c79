"""The table benchmarks/gpu_check.sh ends with: tokens/s and MFU of each `seedlm train` run, from the run's own
metrics.jsonl, and the DeltaProduct kernel each run chose (from its log).

    python benchmarks/gpu_check_summary.py OUT_DIR dense moe deltaproduct
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

WARMUP_STEPS = 3  # the first steps compile the blocks: left out of the means
GOALS = {"dense": "MFU >= 45%", "moe": "MFU >= 35%", "deltaproduct": "tokens/s >= 0.8x dense"}


def run_row(out: Path, name: str) -> dict:
    metrics = out / name / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    steps = [r for r in rows if "loss" in r]
    timed = steps[WARMUP_STEPS:]
    log = out / f"{name}.log"
    kernel = [line.split("DeltaProduct kernel for ", 1)[1] for line in (log.read_text().splitlines()
              if log.is_file() else []) if "DeltaProduct kernel for " in line]
    return {
        "name": name,
        "steps": len(steps),
        "tokens_per_sec": statistics.mean(r["tokens_per_sec"] for r in timed) if timed else None,
        "mfu": statistics.mean(r["mfu"] for r in timed if r.get("mfu") is not None) if timed else None,
        "last_loss": steps[-1]["loss"] if steps else None,
        "kernel": kernel[0] if kernel else "",
    }


def main(argv: list[str]) -> int:
    out, names = Path(argv[0]), argv[1:]
    versions = out / "versions.txt"
    print(f"device: {versions.read_text().strip() if versions.is_file() else 'unknown'}\n")
    print(f"| run | steps | tokens/s (steps > {WARMUP_STEPS}) | MFU | last loss | goal | DeltaProduct kernel |")
    print("|---|---|---|---|---|---|---|")
    rows = {name: run_row(out, name) for name in names}
    for row in rows.values():
        if row["tokens_per_sec"] is None:
            print(f"| {row['name']} | {row['steps']} | did not finish (see {row['name']}.log) | | | "
                  f"{GOALS.get(row['name'], '')} | |")
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        print(f"| {row['name']} | {row['steps']} | {row['tokens_per_sec']:,.0f} | {mfu} | {row['last_loss']:.3f} | "
              f"{GOALS.get(row['name'], '')} | {row['kernel']} |")
    dense, dp = rows.get("dense", {}), rows.get("deltaproduct", {})
    if dense.get("tokens_per_sec") and dp.get("tokens_per_sec"):
        print(f"\nDeltaProduct / dense tokens/s: {dp['tokens_per_sec'] / dense['tokens_per_sec']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
