"""Synthetic tasks as `seedlm train` data (data.synthetic: data_pipeline/synthetic.py, joined to the task's records
and accuracy in eval/synthetic.py by launch/training_data.py): aligned-target batches, the unshifted loss through
both model families, config mistakes, and short runs of the state-tracking presets."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from seedlm.data_pipeline import DataError
from seedlm.data_pipeline.synthetic import SyntheticConfig, SyntheticLoader, validation_records
from seedlm.eval.harness import heldout_loss
from seedlm.eval.synthetic import IGNORE_INDEX, Group, state_tracking_records
from seedlm.launch.cli import main as seedlm
from seedlm.launch.config import ConfigError, load_run_config
from seedlm.launch.training_data import SyntheticData, synthetic_config
from tests.test_eval_utils import tiny_model

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs" / "state_tracking").glob("s3_*.yaml"))  # the S3 table's three rows
HARDER_ROWS = sorted((REPO / "configs" / "state_tracking").glob("[as][45]_*.yaml"))  # S4, A5, S5
NEGATIVE_EIGENVALUE_ROWS = sorted((REPO / "configs" / "paper" / "negative_eigenvalues").glob("*.yaml"))


def task_loader(cfg: SyntheticConfig, *args, **kwargs) -> SyntheticLoader:
    """The data_pipeline loader over the task's records, as the trainer builds it."""
    return SyntheticLoader(cfg, SyntheticData(cfg).generate, *args, **kwargs)


def test_training_batches_hold_the_running_products_aligned():
    cfg = SyntheticConfig(group="S3", train_length=12, seed=5)
    g = Group("S3")
    batches = iter(task_loader(cfg, micro_batch_size=4, rank=0, world_size=2))
    first, second = next(batches), next(batches)
    assert set(first) == {"input_ids", "labels", "shift_labels", "position_ids"}
    assert first["input_ids"].shape == (4, 12) and first["input_ids"].dtype == torch.long
    assert torch.equal(first["labels"], first["shift_labels"])
    for ids, targets in zip(first["input_ids"].tolist(), first["shift_labels"].tolist()):
        assert targets == g.running_products(ids)  # targets[t] = e_1 ... e_t: aligned, no shift
        assert max(ids + targets) < g.order
    assert torch.equal(first["position_ids"][0], torch.arange(12))
    assert not torch.equal(first["input_ids"], second["input_ids"])  # a fresh stream, batch after batch
    other_rank = next(iter(task_loader(cfg, micro_batch_size=4, rank=1, world_size=2)))
    assert not torch.equal(first["input_ids"], other_rank["input_ids"])


def test_training_stream_resumes_exactly_and_refuses_another_setup():
    cfg = SyntheticConfig(group="S4", train_length=8)
    loader = task_loader(cfg, micro_batch_size=3, rank=0, world_size=1)
    stream = iter(loader)
    for _ in range(3):
        next(stream)
    state = loader.state_dict()  # taken after three batches
    expected = next(stream)
    resumed = task_loader(cfg, micro_batch_size=3, rank=0, world_size=1)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))["input_ids"], expected["input_ids"])
    with pytest.raises(DataError, match="micro_batch_size"):
        task_loader(cfg, micro_batch_size=5, rank=0, world_size=1).load_state_dict(state)


def test_length_curriculum_counts_optimizer_steps():
    cfg = SyntheticConfig(group="S3", train_length=12, curriculum_length=4, curriculum_steps=2)
    stream = iter(task_loader(cfg, micro_batch_size=2, rank=0, world_size=1, grad_accum_steps=3))
    lengths = [next(stream)["input_ids"].shape[1] for _ in range(9)]
    assert lengths == [4] * 6 + [12] * 3  # 2 steps of 3 micro-batches at length 4, then train_length
    assert synthetic_config({"synthetic": {"curriculum_length": 4, "curriculum_steps": 2}}).length_at(2) == 128


def test_validation_split_is_one_pass_shared_out_between_ranks():
    cfg = SyntheticConfig(group="S3", train_length=6, num_val=10)
    shares = [list(task_loader(cfg, 3, rank, 2, split="validation")) for rank in range(2)]
    rows = [row for share in shares for batch in share for row in batch["input_ids"].tolist()]
    assert sorted(rows) == sorted(r["input_ids"] for r in validation_records(cfg, SyntheticData(cfg).generate))
    train_rows = next(iter(task_loader(cfg, 10, 0, 1)))["input_ids"].tolist()
    assert not set(map(tuple, train_rows)) & set(map(tuple, rows))


@pytest.mark.parametrize("family", ["deltaproduct", "gated_moe"])
def test_aligned_targets_give_the_unshifted_cross_entropy(family):
    net = tiny_model(family, vocab_size=8, num_experts=0)
    batch = next(iter(task_loader(SyntheticConfig(group="S3", train_length=10), 3, 0, 1)))
    targets = batch["shift_labels"].clone()
    targets[0, :4] = IGNORE_INDEX  # positions without a question are left out
    seen = []
    backbone_forward = net.model.forward

    def spy(*args, **kwargs):  # what reaches the layers
        seen.append(set(kwargs))
        return backbone_forward(*args, **kwargs)

    net.model.forward = spy
    out = net(input_ids=batch["input_ids"], labels=targets, shift_labels=targets, num_items_in_batch=None)
    logits = out.logits.float()  # [B, T, V]
    by_hand = F.cross_entropy(logits.reshape(-1, 8), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    shifted = F.cross_entropy(logits[:, :-1].reshape(-1, 8), targets[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(out.loss, by_hand, atol=1e-6) and not torch.allclose(out.loss, shifted, atol=1e-3)
    assert not seen[0] & {"shift_labels", "num_items_in_batch", "ignore_index"}
    only_shift = net(input_ids=batch["input_ids"], shift_labels=targets).loss  # aligned targets alone ask too
    assert torch.allclose(only_shift, by_hand, atol=1e-6)
    # token-weighted sum over a gradient-accumulation batch: num_items_in_batch reaches the loss
    summed = net(input_ids=batch["input_ids"], shift_labels=targets, num_items_in_batch=torch.tensor(1.0)).loss
    assert torch.allclose(summed, by_hand * int((targets != IGNORE_INDEX).sum()), rtol=1e-5)
    # the held-out loss reads the aligned targets the same way
    held_out = heldout_loss(net, [{**batch, "labels": targets, "shift_labels": targets}])
    assert held_out["loss"] == pytest.approx(float(by_hand.detach()), rel=1e-5)
    assert held_out["tokens"] == int((targets != IGNORE_INDEX).sum())


# the schema's checks (unknown keys, types) and the group's are ConfigErrors, data_pipeline's value checks DataErrors:
# both are user errors, shown by `seedlm train` as one line with exit code 2
@pytest.mark.parametrize("data, error, match", [
    ({"synthetic": {"task": "state_tracking", "grup": "S3"}}, ConfigError, "data.synthetic.grup; did you mean 'group'"),
    ({"synthetic": {"group": "S9"}}, ConfigError, "data.synthetic.group: S9: permutation groups of degree 2..6"),
    ({"synthetic": {"task": "state_trakcing"}}, DataError, "did you mean 'state_tracking'"),
    ({"synthetic": {"train_length": 0}}, DataError, "train_length must be >= 1"),
    ({"synthetic": {"train_length": "long"}}, ConfigError, "data.synthetic.train_length must be int"),
    ({"synthetic": "S3"}, DataError, "data.synthetic must be a mapping"),
    ({"synthetic": {}, "sources": ["stdlib"]}, DataError, "data.sources has no meaning with data.synthetic"),
    ({"synthetic": {"train_length": 64}, "seq_len": 128}, DataError,
     "data.seq_len=128 but data.synthetic.train_length=64"),
    ({"synthetic": {"curriculum_length": 16}}, DataError, "curriculum_length and curriculum_steps go together"),
    ({"synthetic": {"curriculum_length": 256, "curriculum_steps": 5}}, DataError,
     "must be between 1 and train_length - 1"),
])
def test_synthetic_config_mistakes_name_the_fix(data, error, match):
    with pytest.raises(error, match=match.replace("(", r"\(").replace(".", r"\.")):
        synthetic_config(data)


def test_data_pipeline_batches_any_generator_without_importing_eval_or_launch(tmp_path):
    # the dependency rule: data_pipeline uses no other seedlm package; the records come from the caller
    script = """
import sys
from seedlm.data_pipeline.synthetic import SyntheticConfig, SyntheticLoader, write_vocabulary_tokenizer

def count_up(num, length, seed):  # a task of our own: the target at t is t
    return [{"input_ids": [1] * length, "targets": list(range(length))} for _ in range(num)]

cfg = SyntheticConfig(train_length=5)
batch = next(iter(SyntheticLoader(cfg, count_up, micro_batch_size=2, rank=0, world_size=1)))
assert batch["shift_labels"].tolist() == [[0, 1, 2, 3, 4]] * 2, batch
tok = write_vocabulary_tokenizer(cfg, ["a", "b"], sys.argv[1])
assert tok("b a c")["input_ids"] == [1, 0, tok.unk_token_id] and len(tok) == 4
loaded = sorted(m for m in sys.modules if m.startswith(("seedlm.eval", "seedlm.launch")))
assert not loaded, loaded
print("ok")
"""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tok")], cwd=repo, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_config_mistakes_stop_seedlm_train_before_compute(tmp_path, capsys):
    preset = str(PRESETS[0])
    assert seedlm(["train", preset, "data.synthetic.grop=S4", f"output_dir={tmp_path / 'a'}"]) == 2
    assert "unknown key data.synthetic.grop; did you mean 'group'" in capsys.readouterr().err
    assert seedlm(["train", preset, "train.eval_tasks=[tiny_qa]", f"output_dir={tmp_path / 'b'}"]) == 2
    assert "text tasks" in capsys.readouterr().err
    assert seedlm(["train", preset, f"tokenizer.path={tmp_path}", f"output_dir={tmp_path / 'c'}"]) == 2
    assert "cannot be used with data.synthetic" in capsys.readouterr().err
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_presets_are_the_three_rows_and_differ_only_in_the_row():
    rows, rest = {}, []
    for path in PRESETS:
        run = load_run_config(path).to_dict()
        cfg = synthetic_config(run["data"])
        assert (cfg.group, cfg.train_length, cfg.test_length) == ("S3", 128, 512)
        assert run["model"]["num_hidden_layers"] == 1 and run["model"]["model_type"] == "seedlm_deltaproduct"
        rows[path.stem] = (run["model"].pop("num_householder"), run["model"].pop("allow_neg_eigval"))
        assert run["train"].pop("output_dir") == f"runs/state_tracking/{path.stem}"
        rest.append(run)
    assert rows == {"s3_nh2_neg": (2, True), "s3_nh1_neg": (1, True), "s3_nh2_pos": (2, False)}
    assert all(r == rest[0] for r in rest)  # same width, data, lr, steps and seed: only the row's fields differ


def test_the_harder_rows_differ_from_the_s3_row_only_in_group_and_householder_steps():
    """S4 and A5 at n_h = 2 and 3, S5 at n_h = 4: the S3 row's recipe (width, curriculum, lr, steps, seed)."""
    s3 = load_run_config(REPO / "configs" / "state_tracking" / "s3_nh2_neg.yaml").to_dict()
    rows = {}
    for path in HARDER_ROWS:
        run = load_run_config(path).to_dict()
        group = synthetic_config(run["data"]).group
        rows[path.stem] = (group, run["model"]["num_householder"])
        assert run["model"]["vocab_size"] == Group(group).order + 2  # the elements, <pad>, <unk>
        assert run["train"]["output_dir"] == f"runs/state_tracking/{path.stem}"
        for field in ("num_householder", "vocab_size"):
            run["model"][field] = s3["model"][field]
        run["data"]["synthetic"]["group"], run["train"]["output_dir"] = "S3", s3["train"]["output_dir"]
        assert run == s3, path.name
    assert rows == {"s4_nh2_neg": ("S4", 2), "s4_nh3_neg": ("S4", 3), "a5_nh2_neg": ("A5", 2),
                    "a5_nh3_neg": ("A5", 3), "s5_nh4_neg": ("S5", 4)}


def test_negative_eigenvalue_rows_differ_only_in_task_and_beta_range():
    """Parity (Z2) and addition mod 3 (Z3), n_h = 1, beta in [0, 1] against [0, 2]: train 64, test 4 x 64."""
    rows, rest = {}, []
    for path in NEGATIVE_EIGENVALUE_ROWS:
        run = load_run_config(path).to_dict()
        cfg = synthetic_config(run["data"])
        assert (cfg.train_length, cfg.test_length, run["model"]["num_householder"]) == (64, 256, 1)
        rows[path.stem] = (cfg.group, run["model"].pop("allow_neg_eigval"))
        assert run["model"].pop("vocab_size") == Group(cfg.group).order + 2
        assert run["train"].pop("output_dir") == f"runs/paper/negative_eigenvalues/{path.stem}"
        run["data"]["synthetic"].pop("group")
        rest.append(run)
    assert rows == {"parity_nh1_neg": ("Z2", True), "parity_nh1_pos": ("Z2", False),
                    "mod3_nh1_neg": ("Z3", True), "mod3_nh1_pos": ("Z3", False)}
    assert all(r == rest[0] for r in rest)


def tiny_overrides(out: Path, **extra) -> list[str]:
    # the presets' lr restart (at the curriculum switch, step 1000) scaled to the 4-step run: resumes cross it
    args = {"output_dir": out, "max_steps": 4, "train.lr_restarts": "[3]", "train.eval_interval": 2,
            "train.save_interval": 2,
            "data.micro_batch_size": 4, "data.synthetic.num_val": 8, "data.synthetic.num_test": 6,
            "data.synthetic.eval_sequences": 4, "train.peak_tflops": 1.0, "train.progress_bar": "false",
            "train.tensorboard": "false", **extra}
    return [f"{k}={v}" for k, v in args.items()]


def read_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_seedlm_train_on_a_state_tracking_preset_logs_accuracy(tmp_path, capsys):
    run = tmp_path / "run"
    preset = next(p for p in PRESETS if p.stem == "s3_nh2_neg")
    assert seedlm(["train", str(preset), *tiny_overrides(run)]) == 0
    printed = capsys.readouterr().out
    assert "token accuracy" in printed and "at length 512 (6 sequences)" in printed and "CPU time" in printed
    records = read_records(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for key in ("eval/state_s3/acc_len128", "eval/state_s3/acc_len512", "eval/state_s3/seq_acc_len512"):
        assert 0.0 <= evals[0][key] <= 1.0, key
    final = [r for r in records if r.get("final")]
    assert len(final) == 1 and final[0]["step"] == 4 and final[0]["num_test"] == 6
    assert 0.0 <= final[0]["eval/state_s3/acc_len512"] <= 1.0 and final[0]["cpu_time_s"] > 0
    assert json.loads((run / "synthetic_results.json").read_text()) == final[0]
    # no sentencepiece training: the vocabulary is the 6 elements of S3 and two specials
    tok_files = {p.name for p in (run / "tokenizer").iterdir()}
    assert "tokenizer.json" in tok_files and not any(name.endswith(".model") for name in tok_files)

    # the checkpoint exports and loads as a plain HF folder; its tokenizer reads element names
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert seedlm(["export", str(run), str(tmp_path / "export")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert len(tokenizer) == 8 and tokenizer("012 102 999")["input_ids"] == [0, 2, tokenizer.unk_token_id]
    net = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True)
    assert net(torch.tensor([[0, 2, 3]])).logits.shape == (1, 3, 8)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "synthetic task=state_tracking" in card and "eval/state_s3/acc_len512" in card

    # seedlm eval: the task's own accuracy without --tasks; text tasks are refused with the reason
    capsys.readouterr()
    assert seedlm(["eval", str(tmp_path / "export"), "--limit", "3"]) == 0
    results = json.loads((tmp_path / "export" / "eval_results.json").read_text())["results"]
    assert set(results) >= {"eval/state_s3/acc_len128", "eval/state_s3/acc_len512"}
    assert seedlm(["eval", str(run), "--tasks", "tiny_qa"]) == 2
    assert "text tasks such as 'tiny_qa' do not apply" in capsys.readouterr().err


@pytest.mark.parametrize("preset", HARDER_ROWS + NEGATIVE_EIGENVALUE_ROWS, ids=lambda p: p.stem)
def test_each_paper_preset_trains_and_reports(preset, tmp_path, capsys):
    """A few steps of every row at a tenth of the width: the final report prints the row's accuracy at its test
    length. The group comes from the preset (the vocabulary must cover it)."""
    run = load_run_config(preset).to_dict()
    cfg = synthetic_config(run["data"])
    small = {"model_overrides.hidden_size": 32, "model_overrides.head_dim": 8, "model_overrides.intermediate_size": 64,
             "data.synthetic.curriculum_steps": 2, "train.eval_interval": 0, "max_steps": 3, "train.lr_restarts": "[2]"}
    assert seedlm(["train", str(preset), *tiny_overrides(tmp_path / "run", **small)]) == 0
    assert f"at length {cfg.test_length} (6 sequences)" in capsys.readouterr().out
    final = json.loads((tmp_path / "run" / "synthetic_results.json").read_text())
    assert 0.0 <= final[f"eval/state_{cfg.group.lower()}/acc_len{cfg.test_length}"] <= 1.0


def test_synthetic_run_resumes_with_the_same_losses(tmp_path):
    preset = next(p for p in PRESETS if p.stem == "s3_nh2_neg")
    small = {"model_overrides.hidden_size": 32, "model_overrides.head_dim": 8, "model_overrides.intermediate_size": 64,
             "train.eval_interval": 0}
    assert seedlm(["train", str(preset), *tiny_overrides(tmp_path / "full", **small)]) == 0
    assert seedlm(["train", str(preset), *tiny_overrides(tmp_path / "cut", **small, **{"train.stop_at_step": 2})]) == 0
    assert not [r for r in read_records(tmp_path / "cut") if r.get("final")]  # no final report at an early stop
    assert seedlm(["train", str(preset), *tiny_overrides(tmp_path / "cut", **small, resume="auto")]) == 0

    def losses(run):
        return {r["step"]: r["loss"] for r in read_records(run) if "loss" in r}

    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), rel=1e-6)


def test_two_reflections_per_token_track_s3_over_512_tokens_in_the_kernel():
    """The premise of the n_h = 2 row, checked on our kernel with hand-set weights: every S3 element is at
    most two Householder reflections (beta = 2; a transposition is one, the second step has beta = 0) of
    the permutation representation, and with values v = C^T k the delta rule moves S - C by the reflections
    (S <- S - beta k k^T (S - C)), so S_t = C - P_t C names the running product, exactly, 512 tokens on."""
    from seedlm.model import chunk_delta_product

    g = Group("S3")
    eye = torch.eye(3, dtype=torch.float64)
    mirrors = []
    for i, j in ((0, 1), (0, 2), (1, 2)):
        k = torch.zeros(3, dtype=torch.float64)
        k[i], k[j] = 2**-0.5, -(2**-0.5)
        mirrors.append(k)

    def perm_matrix(p):  # acts on column vectors: the product a*b (apply a, then b) is M(b) @ M(a)
        return torch.stack([eye[p[i]] for i in range(3)], dim=1)

    steps = {}  # element -> ((k1, beta1), (k2, beta2)) with (I - b2 k2 k2^T)(I - b1 k1 k1^T) = M(element)
    for e, p in enumerate(g.elements):
        for k1 in mirrors:
            for k2 in mirrors:
                for b1, b2 in ((2.0, 2.0), (2.0, 0.0)):
                    if torch.allclose((eye - b2 * torch.outer(k2, k2)) @ (eye - b1 * torch.outer(k1, k1)),
                                      perm_matrix(p)):
                        steps[e] = ((k1, b1), (k2, b2))
    assert sorted(steps) == list(range(6))
    records = state_tracking_records("S3", 4, 512, seed="kernel")
    ids = torch.tensor([r["input_ids"] for r in records])  # [B, T]
    B, T = ids.shape
    k = torch.stack([torch.stack([torch.stack([s[0] for s in steps[int(e)]]) for e in row]) for row in ids])
    beta = torch.tensor([[[s[1] for s in steps[int(e)]] for e in row] for row in ids])  # [B, T, 2]
    C = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)  # [K, V=1]: distinct coordinates
    v = k @ C  # [B, T, 2, 1]
    coords = []
    for axis in range(3):  # read S[axis] with q = e_axis
        q = eye[axis].expand(B, T, 1, 3).float()
        o, _ = chunk_delta_product(q, k.reshape(B, 2 * T, 1, 3).float(), v.reshape(B, 2 * T, 1, 1).float(),
                                   beta.reshape(B, 2 * T, 1).float(), scale=1.0, num_householder=2, chunk_size=64)
        coords.append(o[:, :, 0, 0].double())
    state = torch.stack(coords, dim=-1)  # [B, T, 3] in fp32 through the chunked kernel
    codes = torch.stack([(C - perm_matrix(p) @ C)[:, 0] for p in g.elements])  # [6, 3]
    decoded = ((state[..., None, :] - codes) ** 2).sum(-1).argmin(-1)  # nearest code per position
    assert torch.equal(decoded, torch.tensor([r["targets"] for r in records]))
    assert ((state[..., None, :] - codes) ** 2).sum(-1).min(-1).values.max() < 1e-6
