"""Length extrapolation: held-out loss against position, up to several times the training length.

    seqs = token_sequences(tokenizer, texts, length=8 * train_len)   # [N, 8L] from held-out text
    result = loss_by_position(model, seqs, train_length=train_len)  # {"loss": [8L - 1 values], ...}
    plot_loss_by_position({"gated": result, "deltaproduct": other}, "extrapolation.png")

A model that extrapolates keeps a flat (or falling) loss past the training length; one that does not
blows up there. `loss[t]` is the mean next-token loss of predicting token t + 1 from tokens 0..t.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def token_sequences(tokenizer, texts, length: int, max_sequences: int | None = None) -> torch.Tensor:
    """Concatenate the texts' tokens (eos between documents) and cut them into rows of `length`: [N, length]."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows, buffer = [], []
    for text in texts:
        buffer += list(tokenizer(text, add_special_tokens=False)["input_ids"]) + eos
        while len(buffer) >= length:
            rows.append(buffer[:length])
            buffer = buffer[length:]
            if max_sequences is not None and len(rows) >= max_sequences:
                return torch.tensor(rows)
    if not rows:
        raise ValueError(f"the texts hold fewer than {length} tokens: not one sequence of that length")
    return torch.tensor(rows)


@torch.no_grad()
def loss_by_position(model, sequences: torch.Tensor, train_length: int | None = None, batch_size: int = 4) -> dict:
    """Mean next-token loss at every position over sequences [N, T] (one forward per batch, full length).

    Returns {"loss": [T - 1], "positions": [1..T-1] (the predicted token's position), "train_length",
    "mean_loss_within_train", "mean_loss_beyond_train"}."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(sequences.shape[1] - 1, dtype=torch.float64)  # [T-1]
    try:
        for start in range(0, sequences.shape[0], batch_size):
            ids = sequences[start : start + batch_size].to(device)  # [B, T]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [B, T-1, V]
            loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
            total += loss.sum(0).double().cpu()
    finally:
        model.train(was_training)
    mean = (total / sequences.shape[0]).tolist()
    out = {"loss": mean, "positions": list(range(1, sequences.shape[1])), "train_length": train_length}
    if train_length:
        inside, beyond = mean[: train_length - 1], mean[train_length - 1 :]
        out["mean_loss_within_train"] = sum(inside) / len(inside) if inside else None
        out["mean_loss_beyond_train"] = sum(beyond) / len(beyond) if beyond else None
    return out


def plot_loss_by_position(results: dict, path: str | Path, smooth: int = 1, title: str | None = None) -> Path:
    """PNG of loss against position for one result of `loss_by_position` or {label: result}; a dashed
    line marks the training length. `smooth` > 1 averages over that many neighbouring positions."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    if "loss" in results:
        results = {"model": results}
    fig, ax = plt.subplots(figsize=(7, 4))
    train_lengths = set()
    for label, r in results.items():
        loss = torch.tensor(r["loss"])
        if smooth > 1 and len(loss) >= smooth:
            loss = F.avg_pool1d(loss[None, None], smooth, stride=1)[0, 0]
        offset = (smooth - 1) // 2 if smooth > 1 else 0  # centre of each averaged window
        positions = r["positions"][offset : offset + len(loss)]
        ax.plot(positions, loss.tolist(), label=label)
        if r.get("train_length"):
            train_lengths.add(r["train_length"])
    for length in sorted(train_lengths):
        ax.axvline(length, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("position")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title or "held-out loss by position (dashed: training length)")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
