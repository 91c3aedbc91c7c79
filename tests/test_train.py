"""`seedlm train` under DeepSpeed: single process and 2 gloo ranks (ZeRO 1-3), exact resume, checkpoint
fallback, export round trip, push dry run, and the user mistakes that must stop before compute."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seedlm.launch.cli import main as seedlm
from seedlm.launch.config import ConfigError, load_run_config, model_config_from_run
from tests.helpers import run_without_seedlm, tiny_run_overrides, write_tiny_corpus_and_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    return write_tiny_corpus_and_tokenizer(tmp_path_factory.mktemp("corpus"))


def run_args(corpus, tok, output_dir, model="gated_moe_tiny", **extra) -> list[str]:
    defaults = {"output_dir": output_dir, "train.max_steps": 6, "train.save_interval": 3, "train.eval_interval": 3,
                "train.eval_batches": 1, "train.hf_interval": 1}  # the tests below read checkpoints' hf/ folders
    return [model] + tiny_run_overrides(corpus, tok, **{**defaults, **extra})


def torchrun(args: list[str], nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    from seedlm.launch.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}",
           "-m", "seedlm.launch.cli", "train", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_single_process_run_writes_the_run_folder(corpus_and_tokenizer, tmp_path):
    corpus, tok = corpus_and_tokenizer
    assert seedlm(["train", *run_args(corpus, tok, tmp_path / "run")]) == 0
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "tokens_per_sec", "grad_norm", "mfu", "aux_loss", "expert_load_max_over_mean"):
        assert key in steps[0], key
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000003", "step_00000006"]
    assert (run / "config.yaml").is_file() and (run / "loss_curve.png").stat().st_size > 1000
    state = json.loads((run / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["tokens_seen"] == 6 * 2 * 64


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, ep", [(2, 1), (3, 1), (1, 2), (2, 2)],
                         ids=["zero2", "zero3", "zero1-ep2", "zero2-ep2"])  # ZeRO 1 alone: the resume test
def test_two_ranks_train_under_each_zero_stage(corpus_and_tokenizer, tmp_path, zero_stage, ep):
    corpus, tok = corpus_and_tokenizer
    # with expert parallelism the task evaluation's forwards are collectives too: they run in lockstep
    tasks = {"train.eval_tasks": "[tiny_qa]", "train.eval_limit": 6} if ep > 1 and zero_stage == 2 else {}
    result = torchrun(run_args(corpus, tok, tmp_path / "run", zero_stage=zero_stage, expert_parallel_size=ep,
                               max_steps=4, save_interval=4, **{"train.eval_interval": 2, **tasks}))
    assert result.returncode == 0, result.stderr[-4000:]
    run_losses = losses(tmp_path / "run")
    assert sorted(run_losses) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(list(run_losses.values()))))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000004"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["expert_parallel_size"] == ep and state["tokens_seen"] == 4 * 2 * 2 * 64
    from safetensors.torch import load_file

    hf_state = load_file(checkpoint / "hf" / "model.safetensors")
    assert hf_state["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 8  # all experts, gathered
    if tasks:  # the expert-parallel evaluation at step 4 equals one process evaluating the step-4 weights
        from seedlm.data_pipeline import load_tokenizer
        from seedlm.eval import evaluate, flat_metrics
        from seedlm.model import GatedMoeForCausalLM

        logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        logged = next(r for r in logged if r["step"] == 4 and "eval/tiny_qa/acc" in r)
        single = GatedMoeForCausalLM.from_pretrained(checkpoint / "hf").eval()
        expected = flat_metrics(evaluate(single, load_tokenizer(tok), ["tiny_qa"], limit=6, show_progress=False))
        for name, value in expected.items():
            assert logged[name] == pytest.approx(value, abs=1e-6), name
    if ep == 1:  # the consolidated weights equal DeepSpeed's own consolidation of the ZeRO shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ds_state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds")
        for name, tensor in hf_state.items():
            torch.testing.assert_close(tensor, ds_state[name], msg=name)


def test_expert_parallel_mistakes_are_refused_before_compute(corpus_and_tokenizer, tmp_path, capsys):
    corpus, tok = corpus_and_tokenizer
    assert seedlm(["train", *run_args(corpus, tok, tmp_path / "a", expert_parallel_size=2)]) == 2
    assert "expert_parallel_size" in capsys.readouterr().err  # does not divide a world of one
    assert seedlm(["train", *run_args(corpus, tok, tmp_path / "b", model="deltaproduct_tiny",
                                      expert_parallel_size=1, zero_stage=3, max_steps=1, save_interval=1,
                                      **{"train.eval_interval": 0})]) == 0  # dense + ZeRO-3 is fine


@pytest.mark.slow
def test_resume_on_two_ranks_logs_the_same_losses(corpus_and_tokenizer, tmp_path):
    corpus, tok = corpus_and_tokenizer
    straight = torchrun(run_args(corpus, tok, tmp_path / "straight", max_steps=20, save_interval=10,
                                 **{"train.eval_interval": 0}))
    assert straight.returncode == 0, straight.stderr[-4000:]
    # the first half stops at step 10 of the same 20-step run (same lr schedule), as a preempted job would
    first = torchrun(run_args(corpus, tok, tmp_path / "resumed", max_steps=20, save_interval=10,
                              **{"train.eval_interval": 0, "train.stop_at_step": 10}))
    assert first.returncode == 0, first.stderr[-4000:]
    assert sorted(losses(tmp_path / "resumed")) == list(range(1, 11))
    second = torchrun(run_args(corpus, tok, tmp_path / "resumed", max_steps=20, save_interval=10,
                               **{"train.eval_interval": 0}))
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stderr
    expected, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(got) == list(range(1, 21))
    for step in range(11, 21):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step


def test_truncated_newest_checkpoint_falls_back_to_previous(corpus_and_tokenizer, tmp_path, capfd):
    corpus, tok = corpus_and_tokenizer
    run = tmp_path / "run"
    assert seedlm(["train", *run_args(corpus, tok, run, max_steps=6, save_interval=3)]) == 0
    newest = run / "checkpoints" / "step_00000006" / "hf" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a write cut short
    capfd.readouterr()
    assert seedlm(["train", *run_args(corpus, tok, run, max_steps=7, save_interval=3)]) == 0
    log = capfd.readouterr().err
    assert "step_00000006 is not usable" in log and "truncated" in log
    assert "step_00000003 at step 3" in log.split("resumed from")[1].splitlines()[0]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000007"


def test_export_round_trip_without_seedlm(corpus_and_tokenizer, tmp_path):
    corpus, tok = corpus_and_tokenizer
    run = tmp_path / "run"
    assert seedlm(["train", *run_args(corpus, tok, run, model="deltaproduct_tiny", max_steps=3, save_interval=3,
                                      **{"train.eval_interval": 0})]) == 0
    assert seedlm(["export", str(run), str(tmp_path / "export")]) == 0
    exported = tmp_path / "export"
    assert {"config.json", "model.safetensors", "README.md", "generation_config.json", "tokenizer.json",
            "modeling_deltaproduct.py", "delta_product_kernels.py"} <= {p.name for p in exported.iterdir()}
    assert "tokens seen: 384" in (exported / "README.md").read_text()
    # the training model's weights, read from DeepSpeed's own checkpoint independently of the export (one process
    # runs the ZeRO-0 path: the module's state is in the model-states file)
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = run / "checkpoints" / "step_00000003"
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint / "hf"))
    states = torch.load(checkpoint / "ds" / "mp_rank_00_model_states.pt", weights_only=False)
    reference.load_state_dict(states["module"], strict=False)
    reference.tie_weights()
    ids = torch.randint(0, 512, (2, 12))
    torch.save({"ids": ids, "logits": reference.eval()(ids).logits.detach()}, tmp_path / "expected.pt")
    result = run_without_seedlm(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(exported)!r}, trust_remote_code=True)
        tok = AutoTokenizer.from_pretrained({str(exported)!r}, trust_remote_code=True)
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        torch.testing.assert_close(m(expected['ids']).logits, expected['logits'], rtol=1e-5, atol=1e-5)
        print('OK', tok.decode(m.generate(**tok('alpha beta', return_tensors='pt'), max_new_tokens=4)[0]))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK")
    assert seedlm(["export", str(run), str(tmp_path / "export")]) == 2  # not empty: refused


def test_push_dry_run_lists_files_and_never_prints_the_token(corpus_and_tokenizer, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"0" * 10)
    monkeypatch.setenv("HF_TOKEN", "hf_verysecrettoken123")
    assert seedlm(["push", str(folder), "someone/tiny", "--dry-run", "--private"]) == 0
    out = capsys.readouterr().out
    assert "would upload 2 files" in out and "config.json" in out and "private" in out
    assert "hf_verysecrettoken123" not in out
    assert seedlm(["push", str(folder), "no-slash", "--dry-run"]) == 2
    assert "OWNER/NAME" in capsys.readouterr().err
    (folder / "model.safetensors").unlink()
    assert seedlm(["push", str(folder), "someone/tiny", "--dry-run"]) == 2
    assert "no *.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "did you mean 'lr'"),
        (["trian.lr=1"], "did you mean 'train'"),
        (["max_step=3"], "did you mean 'max_steps'"),
        (["train.zero_stage=4"], "train.zero_stage=4 is not allowed"),
        (["train.lr=fast"], "train.lr must be float"),
        (["train.max_steps=1e3"], "train.max_steps must be int"),
        (["train.schedule=linear"], "use one of"),
        (["noequals"], "is not KEY=VALUE"),
        (["max_steps=100", "train.lr_restarts=[50,20]"], "increasing steps between 1 and max_steps - 1"),
        (["max_steps=100", "train.lr_restarts=[100]"], "train.lr_restarts=\\[100\\]"),
    ],
)
def test_config_mistakes_name_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config("gated_moe_tiny", overrides)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_lr_schedule_shapes_and_warm_restarts(schedule):
    from seedlm.launch.engine import lr_lambda

    base = ["max_steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1", f"train.schedule={schedule}"]
    plain = lr_lambda(load_run_config("gated_moe_tiny", base).train)
    assert plain(0) == pytest.approx(1 / 11) and plain(10) == pytest.approx(1.0)  # linear warmup to the peak
    assert plain(100) == pytest.approx(1.0 if schedule == "constant" else 0.1)  # decayed to the floor at the end
    if schedule == "wsd":  # flat until the last 20%
        assert plain(79) == 1.0 and plain(90) < 1.0
    # a restart at 60: steps 60..99 follow a fresh 40-step schedule; steps before it a 60-step one
    restarted = lr_lambda(load_run_config("gated_moe_tiny", [*base, "train.lr_restarts=[60]"]).train)
    first = lr_lambda(load_run_config("gated_moe_tiny", [*base, "max_steps=60"]).train)
    second = lr_lambda(load_run_config("gated_moe_tiny", [*base, "max_steps=40"]).train)
    assert [restarted(s) for s in range(60)] == [first(s) for s in range(60)]
    assert [restarted(s) for s in range(60, 100)] == [second(s) for s in range(40)]


def test_numbers_in_exponent_notation_are_numbers(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model: gated_moe_tiny\ntrain:\n  lr: 3e-4\n")
    run = load_run_config(config_file, ["train.weight_decay=1e-2", "model_overrides.initializer_range=2e-2"])
    assert run.train.lr == 3e-4 and run.train.weight_decay == 1e-2
    assert run.model_overrides["initializer_range"] == 2e-2


def test_user_mistakes_stop_before_compute(corpus_and_tokenizer, tmp_path, capsys):
    corpus, tok = corpus_and_tokenizer
    # tokenizer larger than the model's vocabulary
    assert seedlm(["train", *run_args(corpus, tok, tmp_path / "a", **{"model_overrides.vocab_size": 300})]) == 2
    assert "vocab" in capsys.readouterr().err
    # no file matches the data path
    bad = run_args(corpus, tok, tmp_path / "b", **{"data.sources": f"[{{kind: jsonl, path: {tmp_path}/none*.jsonl}}]"})
    assert seedlm(["train", *bad]) == 2
    assert "none*.jsonl" in capsys.readouterr().err
    # a model config the family refuses
    assert seedlm(["train", *run_args(corpus, tok, tmp_path / "c", **{"model_overrides.num_experts_per_tok": 9})]) == 2
    assert "num_experts_per_tok=9" in capsys.readouterr().err
    assert not (tmp_path / "c" / "checkpoints").exists()


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_non_finite_steps_are_skipped_then_the_run_saves_and_stops(corpus_and_tokenizer, tmp_path, capfd, zero_stage):
    corpus, tok = corpus_and_tokenizer
    run = tmp_path / "run"
    # weights of 1e30: the normed loss stays finite but the gradient norm overflows from the first step
    args = run_args(corpus, tok, run, max_steps=10, zero_stage=zero_stage,
                    **{"model_overrides.initializer_range": 1e30, "train.max_consecutive_nonfinite": 3})
    if zero_stage == 0:  # the trainer's own check (fp32 without ZeRO)
        assert seedlm(["train", *args]) == 0
        log = capfd.readouterr().err
    else:  # DeepSpeed's ZeRO optimizer skips the update; ZeRO runs only with several ranks (one takes the ZeRO-0 path)
        result = torchrun(args)
        assert result.returncode == 0, result.stderr[-4000:]
        log = result.stderr
    assert "3 non-finite steps in a row" in log
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if "loss" in r] == [1, 2, 3]
    # a skipped update still moves the lr schedule on: the lr stays the planned one for each step
    from seedlm.launch.engine import lr_lambda

    train_cfg = load_run_config(args[0], args[1:]).train
    planned = [train_cfg.lr * lr_lambda(train_cfg)(step) for step in (1, 2, 3)]
    assert [r["lr"] for r in records if "loss" in r] == pytest.approx(planned, rel=1e-9)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    from safetensors.torch import load_file

    # no update reached the weights: they are still the initial ones (norm weights exactly 1.0)
    weights = load_file(run / "checkpoints" / "step_00000003" / "hf" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert torch.equal(weights["model.norm.weight"], torch.ones_like(weights["model.norm.weight"]))


def test_zero_1_and_2_in_one_process_take_the_zero_0_path_with_the_same_numbers(corpus_and_tokenizer, tmp_path,
                                                                                  capfd):
    corpus, tok = corpus_and_tokenizer
    for stage in (0, 1):
        assert seedlm(["train", *run_args(corpus, tok, tmp_path / f"z{stage}", max_steps=3, zero_stage=stage,
                                          **{"train.eval_interval": 0})]) == 0
    assert "zero_stage=1 partitions nothing in one process: running the ZeRO-0 path" in capfd.readouterr().err
    assert losses(tmp_path / "z1") == losses(tmp_path / "z0")
    written = load_run_config(str(tmp_path / "z1" / "config.yaml"))
    assert written.train.zero_stage == 1  # the run folder keeps what was asked


def test_resume_with_another_world_size_is_refused(corpus_and_tokenizer, tmp_path, capsys):
    corpus, tok = corpus_and_tokenizer
    run = tmp_path / "run"
    assert seedlm(["train", *run_args(corpus, tok, run, max_steps=2, save_interval=2,
                                      **{"train.eval_interval": 0})]) == 0
    state_file = run / "checkpoints" / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["world_size"] = 4  # as if written by a 4-rank job
    state_file.write_text(json.dumps(state))
    rank_file = state_file.parent / "rank_00000.pt"  # a data position that cannot move: an older seedlm's
    rank_state = torch.load(rank_file, weights_only=False)
    rank_state["data"]["format"] = "seedlm.data_state.v1"
    torch.save(rank_state, rank_file)
    from seedlm.launch.checkpoint import write_manifest

    write_manifest(state_file.parent)  # a complete checkpoint, just from another launch
    capsys.readouterr()
    assert seedlm(["train", *run_args(corpus, tok, run, max_steps=4, **{"train.eval_interval": 0})]) == 2
    assert "written by 4 ranks, this run has 1" in capsys.readouterr().err


def test_eval_tasks_run_with_the_held_out_loss(corpus_and_tokenizer, tmp_path, capsys):
    corpus, tok = corpus_and_tokenizer
    run = tmp_path / "run"
    args = run_args(corpus, tok, run, max_steps=2, save_interval=2,
                    **{"train.eval_interval": 2, "train.eval_tasks": "[tiny_qa]", "train.eval_limit": 4})
    assert seedlm(["train", *args]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) == 1 and 0.0 <= evals[0]["eval/tiny_qa/acc"] <= 1.0
    typo = run_args(corpus, tok, tmp_path / "typo", **{"train.eval_tasks": "[tiny_qaa]"})
    assert seedlm(["train", *typo]) == 2
    assert "tiny_qaa" in capsys.readouterr().err
    assert not (tmp_path / "typo" / "checkpoints").exists()


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the training process with RANK=rank among the launcher's descendants (Linux /proc)."""
    children = [launcher_pid]
    while children:
        pid = children.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            children += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if pid != launcher_pid and f"RANK={rank}".encode() in env:
            return pid
    return None


@pytest.mark.slow
def test_a_failed_rank_fails_the_launcher_and_the_last_checkpoint_stays_valid(corpus_and_tokenizer, tmp_path):
    import signal
    import time

    from seedlm.launch.checkpoint import find_resume_checkpoint

    corpus, tok = corpus_and_tokenizer
    run = tmp_path / "run"
    # a loader worker per rank: the survivor's worker is terminated with it, which used to be all it reported
    args = run_args(corpus, tok, run, max_steps=400, save_interval=2,
                    **{"train.eval_interval": 0, "data.num_workers": 1})
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    from seedlm.launch.distributed import free_port

    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "-m", "seedlm.launch.cli", "train", *args],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while find_resume_checkpoint(run / "checkpoints") is None:  # training has saved once
            assert launcher.poll() is None and time.monotonic() < deadline, "the run never saved a checkpoint"
            time.sleep(0.5)
        rank1 = worker_pid(launcher.pid, rank=1)
        assert rank1 is not None
        os.kill(rank1, signal.SIGKILL)  # a rank dies mid-run (OOM killer, node failure)
        _, log = launcher.communicate(timeout=240)
    finally:
        launcher.kill()
    assert launcher.returncode != 0, "the launcher must report a failed rank"
    assert "FAILED" in log or "failed" in log
    # the surviving rank says it is not the cause, where the cause is named, and what is left to resume from
    survivor = [line for line in log.splitlines() if line.startswith("seedlm train: rank 0 stopped")]
    assert len(survivor) == 1, log[-4000:]
    assert "another rank failed first" in survivor[0] and "Root Cause" in survivor[0]
    assert "the last complete checkpoint is" in survivor[0]
    # no traceback from the survivor; the killed rank's orphaned loader worker may report its broken connection
    survivor_log = [line for line in log.split("Root Cause")[0].split("torch.distributed.run")[0].splitlines()
                    if not line.startswith("[rank1]")]
    assert "Traceback" not in "\n".join(survivor_log)
    # whatever step the kill interrupted (a save included), `latest` names a complete checkpoint to resume from
    latest = find_resume_checkpoint(run / "checkpoints")
    assert latest is not None and latest.name == (run / "checkpoints" / "latest").read_text().strip()
    saved_step = json.loads((latest / "trainer_state.json").read_text())["step"]
    assert saved_step < 400
    resumed = torchrun(run_args(corpus, tok, run, max_steps=saved_step + 2, save_interval=2,
                                **{"train.eval_interval": 0, "data.num_workers": 1}))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"at step {saved_step}" in resumed.stderr.split("resumed from")[1].splitlines()[0]
    # the history as it stands: rows the killed run logged past its last published save are redone, and dropped
    from seedlm.launch.metrics import read_metrics

    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps[-2:] == [saved_step + 1, saved_step + 2]


def test_zero0_run_equals_a_plain_pytorch_loop(corpus_and_tokenizer, tmp_path):
    """DeepSpeed at ZeRO 0 (fp32, the trainer clipping itself) changes no number: the same model, batches,
    AdamW groups, schedule and clipping in a plain loop give the same losses and gradient norms."""
    from seedlm.data_pipeline import DataConfig, build_dataloader, load_tokenizer
    from seedlm.launch.engine import build_model, lr_lambda
    from seedlm.launch.expert_parallel import optimizer_param_groups
    from seedlm.launch.materialize import materialize

    corpus, tok = corpus_and_tokenizer
    args = run_args(corpus, tok, tmp_path / "run", max_steps=5, zero_stage=0,
                    **{"train.eval_interval": 0, "train.grad_clip": 0.05})  # small enough to clip every step
    assert seedlm(["train", *args]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    run = load_run_config(args[0], args[1:])
    t, tokenizer = run.train, load_tokenizer(tok)
    net = materialize(build_model(run.train, model_config_from_run(run), tokenizer), t.seed).train()
    opt = torch.optim.AdamW(optimizer_param_groups(net, t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
    batches = iter(build_dataloader(DataConfig.from_dict({**run.data, "tokenizer": str(tok)}), tokenizer))
    for record in records:
        batch = next(batches)
        loss = net(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"]).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        assert record["loss"] == pytest.approx(loss.item(), rel=1e-6), record["step"]
        assert record["grad_norm"] == pytest.approx(norm.item(), rel=1e-5) and norm > t.grad_clip, record["step"]
        assert record["lr"] == pytest.approx(schedule.get_last_lr()[0], rel=1e-9), record["step"]
