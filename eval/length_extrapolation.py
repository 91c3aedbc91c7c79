"""Length extrapolation: held-out loss against position, up to several times the training length.

    seqs = token_sequences(tokenizer, texts, length=8 * train_len)   # [N, 8L] from held-out text
    result = loss_by_position(model, seqs, train_length=train_len)  # {"loss": [8L - 1 values], ...}
    loss_near(result, 4 * train_len)                                 # mean loss over positions (3.5L, 4L]
    plot_loss_by_position({"gated": result, "deltaproduct": other}, "extrapolation.png")

A model that extrapolates keeps a flat (or falling) loss past the training length; one that does not
blows up there. `loss[t]` is the mean next-token loss of predicting token t + 1 from tokens 0..t.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def token_sequences(tokenizer, texts, length: int, max_sequences: int | None = None, bos: bool = False,
                    one_per_document: bool = False) -> torch.Tensor:
    """Rows of `length` tokens from the texts: [N, length]. By default the documents' tokens are concatenated
    (eos after each) and cut into rows. `bos` puts the tokenizer's bos before each document, as the packer does
    in training. `one_per_document`: each row is instead the start of one document (shorter ones skipped), so
    position 0 is a document start, where attention sinks form."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    start = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    rows, buffer = [], []
    for text in texts:
        doc = start + list(tokenizer(text, add_special_tokens=False)["input_ids"]) + eos
        buffer = doc if one_per_document else buffer + doc
        while len(buffer) >= length:
            rows.append(buffer[:length])
            buffer = [] if one_per_document else buffer[length:]
            if max_sequences is not None and len(rows) >= max_sequences:
                return torch.tensor(rows)
    if not rows:
        what = "document holds" if one_per_document else "texts hold"
        raise ValueError(f"no {what} {length} tokens: not one sequence of that length")
    return torch.tensor(rows)


def loss_near(result: dict, position: int) -> float:
    """Mean of `loss_by_position`'s loss over the positions (7/8 position, position]: one number "at" a position,
    averaged over a window that grows with it (single positions are noisy)."""
    lo = position - max(1, position // 8)
    values = [loss for p, loss in zip(result["positions"], result["loss"]) if lo < p <= position]
    if not values:
        raise ValueError(f"position {position} is beyond the {result['positions'][-1]} positions scored")
    return sum(values) / len(values)


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
