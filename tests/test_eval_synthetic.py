"""Synthetic tasks: group arithmetic, seeded data files, exact per-position accuracy, probes."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from seedlm.eval.attention_sinks import attention_sink_stats
from seedlm.eval.harness import evaluate
from seedlm.eval.length_extrapolation import loss_by_position, plot_loss_by_position
from seedlm.eval.synthetic import (
    IGNORE_INDEX,
    Group,
    accuracy_metrics,
    mqar_records,
    read_jsonl,
    state_tracking_records,
    token_accuracy,
    write_state_tracking_data,
    write_synthetic_task,
)
from tests.test_eval_utils import tiny_model, tiny_tokenizer


@pytest.mark.parametrize("name, order", [("S3", 6), ("S4", 24), ("A5", 60), ("S5", 120), ("Z2", 2), ("Z7", 7)])
def test_groups(name, order):
    g = Group(name)
    assert g.order == order
    assert all(g.mul(0, i) == i == g.mul(i, 0) for i in range(order))  # index 0 is the identity
    for a, b, c in itertools.islice(itertools.product(range(order), repeat=3), 0, None, max(1, order**3 // 500)):
        assert g.mul(g.mul(a, b), c) == g.mul(a, g.mul(b, c))
    assert all(sorted(row) == list(range(order)) for row in g.table)  # a Latin square: a group table


def test_running_products_compose_permutations_left_to_right():
    g = Group("S4")
    records = state_tracking_records("S4", 5, 12, seed=3)
    for r in records:
        state = tuple(range(4))
        for e, p in zip(r["input_ids"], r["targets"]):
            perm = g.elements[e]
            state = tuple(perm[state[i]] for i in range(4))  # apply the state so far, then e
            assert g.elements[p] == state
    parity = state_tracking_records("Z2", 3, 20, seed=0)
    for r in parity:
        assert r["targets"] == [sum(r["input_ids"][: t + 1]) % 2 for t in range(20)]


def test_state_tracking_files_are_seeded_and_test_is_longer(tmp_path):
    meta = write_state_tracking_data(tmp_path / "a", "A5", train_length=8, num_train=20, num_test=5, seed=1)
    write_state_tracking_data(tmp_path / "b", "A5", train_length=8, num_train=20, num_test=5, seed=1)
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()
    train, test = read_jsonl(tmp_path / "a" / "train.jsonl"), read_jsonl(tmp_path / "a" / "test.jsonl")
    assert len(train) == 20 and {len(r["input_ids"]) for r in train} == {8}
    assert len(test) == 5 and {len(r["targets"]) for r in test} == {32}
    assert meta["vocab_size"] == 60 and json.loads((tmp_path / "a" / "meta.json").read_text())["group"] == "A5"
    assert max(max(r["input_ids"] + r["targets"]) for r in train + test) < meta["vocab_size"]


class Oracle(torch.nn.Module):
    """Logits that name the running product exactly (wrong from position `fail_from` on)."""

    def __init__(self, group: Group, fail_from: int = 10**9):
        super().__init__()
        self.g, self.fail_from = group, fail_from
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kwargs):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.g.order)
        for b in range(B):
            prods = self.g.running_products(input_ids[b].tolist())
            for t, p in enumerate(prods):
                logits[b, t, p if t < self.fail_from else (p + 1) % self.g.order] = 1.0
        return type("Out", (), {"logits": logits})()


def test_token_accuracy_is_exact_per_position():
    g = Group("S3")
    records = state_tracking_records("S3", 7, 10, seed=0)
    assert token_accuracy(Oracle(g), records, batch_size=3)["accuracy"] == 1.0
    result = token_accuracy(Oracle(g, fail_from=4), records, batch_size=3)
    assert result["per_position"] == [1.0] * 4 + [0.0] * 6
    assert result["accuracy"] == pytest.approx(0.4) and result["sequence_accuracy"] == 0.0


def test_accuracy_metrics_name_each_length_of_the_task():
    # the evaluation a synthetic training run logs: one key per metric and record length
    g = Group("S3")
    short, long = state_tracking_records("S3", 5, 6, seed=1), state_tracking_records("S3", 4, 24, seed=2)
    metrics = accuracy_metrics(Oracle(g, fail_from=12), "state_s3", [short, long], batch_size=2)
    assert metrics == {
        "eval/state_s3/acc_len6": 1.0, "eval/state_s3/seq_acc_len6": 1.0, "eval/state_s3/last_acc_len6": 1.0,
        "eval/state_s3/acc_len24": 0.5, "eval/state_s3/seq_acc_len24": 0.0, "eval/state_s3/last_acc_len24": 0.0,
    }


def test_aligned_targets_train_with_transformers_unshifted_loss():
    # the documented recipe: model(x, labels=y, shift_labels=y) scores logits[t] against targets[t]
    records = state_tracking_records("S3", 4, 8, seed=0)
    net = tiny_model("deltaproduct", 6, num_hidden_layers=1)
    x = torch.tensor([r["input_ids"] for r in records])
    y = torch.tensor([r["targets"] for r in records])
    with torch.no_grad():
        out = net(input_ids=x, labels=y, shift_labels=y)
    expected = F.cross_entropy(out.logits.reshape(-1, 6).float(), y.reshape(-1))
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)


def test_mqar_targets_are_the_recalled_values():
    for r in mqar_records(5, num_pairs=6, num_queries=4, num_keys=16, num_values=8, seed=0):
        ids, targets = r["input_ids"], r["targets"]
        assert len(ids) == len(targets) == 20
        pairs = dict(zip(ids[0:12:2], ids[1:12:2]))
        asked = [(t, tgt) for t, tgt in enumerate(targets) if tgt != IGNORE_INDEX]
        assert len(asked) == 4 and all(t >= 12 and pairs[ids[t]] == tgt for t, tgt in asked)


def test_synthetic_text_tasks_run_in_the_harness(tmp_path):
    tok = tiny_tokenizer(str(tmp_path / "tok"))
    net = tiny_model("deltaproduct", len(tok))
    path = write_synthetic_task("state_s3", tmp_path / "tasks", num_docs=6)
    results = evaluate(net, tok, ["parity", "mqar", str(path)], limit=6, show_progress=False)
    assert all(r["num_docs"] == 6 and 0.0 <= r["acc"] <= 1.0 for r in results.values())


def test_attention_sink_share_of_uniform_attention():
    # zero queries -> every score 0 -> causal uniform attention: query t gives key 0 the share 1 / (t + 1)
    net = tiny_model("gated_moe", 64)
    for layer in net.model.layers:
        torch.nn.init.zeros_(layer.self_attn.q_proj.weight)
    T = 12
    ids = torch.randint(0, 64, (3, T))
    stats = attention_sink_stats(net, ids, batch_size=2)
    expected = sum(1 / (t + 1) for t in range(1, T)) / (T - 1)
    assert stats["first_token_attention_per_layer"] == pytest.approx([expected] * 2, abs=1e-6)
    assert net.config._attn_implementation == "sdpa"  # switched back
    with torch.no_grad():
        hidden = net(ids, output_hidden_states=True).hidden_states  # inputs of each layer, then the final norm
    assert stats["max_activation_per_layer"][0] == pytest.approx(float(hidden[1].abs().max()), rel=1e-6)


def test_attention_sinks_on_deltaproduct_hybrid_and_pure():
    ids = torch.randint(0, 64, (2, 10))
    hybrid = attention_sink_stats(tiny_model("deltaproduct", 64, attn_layers=[1]), ids)
    assert hybrid["attention_layers"] == ["model.layers.1.attn"] and 0 < hybrid["first_token_attention"] < 1
    pure = attention_sink_stats(tiny_model("deltaproduct", 64), ids)
    assert pure["first_token_attention"] is None and len(pure["max_activation_per_layer"]) == 2


def test_loss_by_position_and_plot(tmp_path):
    net = tiny_model("deltaproduct", 64)
    seqs = torch.randint(0, 64, (3, 24))
    result = loss_by_position(net, seqs, train_length=6, batch_size=2)
    with torch.no_grad():
        logits = net(seqs).logits[:, :-1]
    expected = F.cross_entropy(logits.transpose(1, 2), seqs[:, 1:], reduction="none").mean(0)
    assert result["loss"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert result["mean_loss_within_train"] == pytest.approx(float(expected[:5].mean()), abs=1e-5)
    png = plot_loss_by_position({"dp": result}, tmp_path / "x.png", smooth=3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
