"""Training metrics: MFU (its FLOPs per token come from the model config), and the sinks (metrics.jsonl,
TensorBoard, W&B, a PNG).

Only rank 0 writes. metrics.jsonl holds one JSON object per logged step with at least step, loss, lr and
tokens_per_sec; the other sinks get the same numbers. The file is only ever appended to: a resumed run first
appends a row `{"step": N, "resumed_from_step": N, ...}`, and the steps after N that the interrupted attempt had
logged are redone. `read_metrics` gives the run's history as it stands (the redone rows replace the old ones).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def saved_bytes_for_backward(fn, exclude=()) -> int:
    """Bytes autograd keeps for backward while fn() runs its forward: the distinct storages of the saved tensors,
    leaving out those of `exclude` (weights or inputs, resident anyway). A memory measure that load does not
    change (the per-token numbers in the README and the memory tests come from it)."""
    storages, skip = {}, {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Achieved matmul FLOP/s on this device: the denominator of MFU when no peak is configured."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        import resource

        return {"memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB
    except ImportError:
        return {}


class MetricsLogger:
    """Rank 0 writes; other ranks hold an inactive logger so call sites need no rank checks."""

    def __init__(self, output_dir: Path, active: bool, tensorboard: bool, wandb_project: str | None, config: dict):
        self.active = active
        self.path = output_dir / "metrics.jsonl"
        self.tb = self.wandb = None
        if not active:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, dir=str(output_dir), config=config, resume="allow")

    def append_row(self, record: dict) -> None:
        if self.active:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def log_resume(self, step: int, checkpoint: Path) -> None:
        """Mark a resume in metrics.jsonl (only there): the rows an earlier attempt logged after `step` are
        void from here on, as read_metrics reads the file."""
        self.append_row({"step": step, "resumed_from_step": step, "checkpoint": str(checkpoint)})

    def log(self, record: dict) -> None:
        if not self.active:
            return
        self.append_row(record)
        step = record["step"]
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's rows as the run's history stands: at each resume row (resume_record), the rows of later
    steps written before it are dropped, since the resumed run redid those steps. The resume rows are kept."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "resumed_from_step" in record:
            records = [r for r in records if r["step"] <= record["resumed_from_step"]]
        records.append(record)
    return records


def plot_loss_curve(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Training loss (and held-out loss where logged) against step, as a PNG."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    resumes = [r["step"] for r in records if "resumed_from_step" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="training loss", linewidth=1)
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="held-out loss")
    for i, step in enumerate(resumes):
        ax.axvline(step, color="grey", linestyle=":", linewidth=1, label="resumed" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot_heldout_curves(curves: dict[str, list[tuple[int, float]]], out_png: Path, title: str = "",
                        groups: dict[str, str] | None = None) -> Path:
    """Held-out loss against step for several runs ({label: [(step, eval_loss), ...]}), as one PNG; runs of one
    group (groups: {label: group}, e.g. the seeds of a variant) share a colour and differ in line style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = groups or {label: label for label in curves}
    colours = {g: f"C{i}" for i, g in enumerate(dict.fromkeys(groups.values()))}
    seen: dict[str, int] = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        n = seen[groups[label]] = seen.get(groups[label], -1) + 1
        ax.plot(*zip(*points), marker="o", linestyle=("-", "--", ":", "-.")[n % 4], markersize=3, linewidth=1,
                color=colours[groups[label]], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
