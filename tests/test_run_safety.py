"""Nothing is lost when a run is stopped or cannot write: Ctrl-C saves, a full disk during a save leaves the
previous checkpoint as `latest` with a message that says so, an unwritable output_dir is refused at start, and
metrics.jsonl after a resume reads as one history."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seedlm.launch.checkpoint import find_resume_checkpoint
from seedlm.launch.cli import main as seedlm
from seedlm.launch.metrics import read_metrics
from tests.helpers import tiny_run_overrides, write_tiny_corpus_and_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    return write_tiny_corpus_and_tokenizer(tmp_path_factory.mktemp("corpus"))


def train_args(corpus, tok, run: Path, **fields) -> list[str]:
    fields = {"output_dir": run, "train.eval_interval": 0, **fields}
    return ["train", "gated_moe_tiny", *tiny_run_overrides(corpus, tok, **fields)]


def start_training(args: list[str], preexec_fn=None) -> subprocess.Popen:
    # a fresh single process: not the rendezvous of a run this test process made in-process
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "seedlm.launch.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec_fn)


def wait_for_logged_step(run: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any("loss" in r for r in read_metrics(run / "metrics.jsonl")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never logged a step"
        time.sleep(0.2)


def test_ctrl_c_saves_at_the_step_boundary_and_the_run_resumes(corpus_and_tokenizer, tmp_path):
    corpus, tok = corpus_and_tokenizer
    run = tmp_path / "run"
    args = train_args(corpus, tok, run, max_steps=100000, save_interval=100000)
    process = start_training(args)
    wait_for_logged_step(run, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]
    assert "Ctrl-C: saving a checkpoint" in err
    stopped = int(out.split("finished at step ")[1].split()[0])
    assert "(signal SIGINT)" in out
    latest = find_resume_checkpoint(run / "checkpoints")
    assert latest is not None and json.loads((latest / "trainer_state.json").read_text())["step"] == stopped
    # the same command continues from the saved step
    assert seedlm(train_args(corpus, tok, run, max_steps=stopped + 1, save_interval=100000)) == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r][-1] == stopped + 1


def test_a_second_ctrl_c_exits_at_once():
    from seedlm.launch.trainer import StopSignal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # CI may start us with SIGINT ignored
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: noted, training goes on to the step boundary
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; the KeyboardInterrupt arrives here
    finally:
        stop.restore()
        restored = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, before)
    assert restored is signal.default_int_handler and stop.previous


def test_an_interrupted_run_says_so(corpus_and_tokenizer, tmp_path, capsys, monkeypatch):
    from seedlm.launch import trainer

    def interrupted(run_config):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)  # stands for the second Ctrl-C mid-step
    corpus, tok = corpus_and_tokenizer
    assert seedlm(train_args(corpus, tok, tmp_path / "run", max_steps=2)) == 130
    assert "interrupted; the steps since the last checkpoint are lost" in capsys.readouterr().err


def limit_file_size(max_bytes: int):
    """For preexec_fn: files this process writes cannot grow past max_bytes; the write fails with EFBIG
    (SIGXFSZ ignored) as it would on a full disk with ENOSPC."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def test_a_failed_save_reports_the_path_and_keeps_the_previous_checkpoint(corpus_and_tokenizer, tmp_path):
    corpus, tok = corpus_and_tokenizer
    run = tmp_path / "run"
    assert seedlm(train_args(corpus, tok, run, max_steps=2, save_interval=2)) == 0
    saved = run / "checkpoints" / "step_00000002"
    biggest = max(p.stat().st_size for p in saved.rglob("*") if p.is_file())
    # the resumed run can write its logs and small files, but not the checkpoint's largest file
    process = start_training(train_args(corpus, tok, run, max_steps=4, save_interval=2),
                             preexec_fn=limit_file_size(biggest // 2))
    _, err = process.communicate(timeout=240)
    assert process.returncode == 2, err[-3000:]
    message = err.strip().splitlines()[-1]
    assert message.startswith("seedlm train: could not write the checkpoint of step 4 into ")
    assert str(run / "checkpoints") in message and "MiB free" in message
    assert "step_00000002 is still the latest checkpoint" in message and "Traceback" not in err
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]  # no .tmp left
    assert find_resume_checkpoint(run / "checkpoints") == saved


@pytest.fixture
def small_filesystem(tmp_path):
    """A mount point for a tmpfs of a chosen size (a real full disk); skipped where mounting is not allowed."""
    mount_point = tmp_path / "small_fs"
    mount_point.mkdir()
    mounted = []

    def mount(size_bytes: int) -> Path:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount_point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_full_disk_during_a_save_says_no_space_left(corpus_and_tokenizer, tmp_path, small_filesystem):
    import shutil

    corpus, tok = corpus_and_tokenizer
    first = tmp_path / "first"
    assert seedlm(train_args(corpus, tok, first, max_steps=2, save_interval=2)) == 0
    size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    checkpoint = sum(p.stat().st_size for p in (first / "checkpoints").rglob("*") if p.is_file())
    # room for the run as it is plus half a checkpoint: the next save fills the disk
    run = small_filesystem(size + checkpoint // 2) / "run"
    shutil.copytree(first, run)
    process = start_training(train_args(corpus, tok, run, max_steps=4, save_interval=2))
    _, err = process.communicate(timeout=240)
    assert process.returncode == 2, err[-3000:]
    message = err.strip().splitlines()[-1]
    assert "could not write the checkpoint of step 4" in message and "no space left" in message, message
    assert "step_00000002 is still the latest checkpoint" in message and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert find_resume_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_00000002"


def test_an_output_dir_that_cannot_be_written_is_refused_at_start(corpus_and_tokenizer, tmp_path, capsys):
    corpus, tok = corpus_and_tokenizer
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert seedlm(train_args(corpus, tok, blocker / "run", max_steps=2)) == 2
    err = capsys.readouterr().err
    assert f"train.output_dir='{blocker / 'run'}' cannot be written" in err and "Traceback" not in err
    if os.geteuid() != 0:  # root writes anywhere; a read-only folder only stops other users
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o555)
        assert seedlm(train_args(corpus, tok, readonly / "run", max_steps=2)) == 2
        assert "cannot be written" in capsys.readouterr().err


def test_metrics_after_a_resume_read_as_one_history(corpus_and_tokenizer, tmp_path):
    corpus, tok = corpus_and_tokenizer
    run = tmp_path / "run"
    assert seedlm(train_args(corpus, tok, run, max_steps=4, save_interval=2)) == 0
    # as if the run had died after logging steps 3 and 4 but before saving step 4: resume from step 2
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_00000004")
    first_attempt = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert seedlm(train_args(corpus, tok, run, max_steps=4, save_interval=2)) == 0
    raw = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw] == [1, 2, 3, 4, 2, 3, 4]  # the file is only appended to
    assert raw[4]["resumed_from_step"] == 2 and raw[4]["checkpoint"].endswith("step_00000002")
    assert not any("resumed_from_step" in r for r in raw[:4] + raw[5:])
    history = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in history] == [1, 2, 2, 3, 4] and history[2] == raw[4]
    resumed = {r["step"]: r["loss"] for r in history if "loss" in r}
    assert resumed == pytest.approx(first_attempt, rel=1e-6)  # exact resume: the redone steps agree


EXITING_CHILD = """
import atexit, sys, threading, time
from seedlm.launch.distributed import exit_process, init_distributed

out = sys.argv[1]
if sys.argv[2] == "distributed":
    init_distributed()  # a world of one on gloo
atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
threading.Thread(target=lambda: (time.sleep(0.5), open(out + ".thread", "w").write("done"))).start()
print("buffered, not yet flushed", end="")  # stdout into a pipe is block-buffered
exit_process(3)
"""


@pytest.mark.parametrize("mode", ["distributed", "plain"])
def test_exit_process_keeps_what_an_interpreter_exit_does(tmp_path, mode):
    # seedlm exits through exit_process once torch.distributed ran (see its docstring): the exit code, the
    # non-daemon threads' work, the atexit handlers and the buffered output must survive it
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    out = tmp_path / "child"
    result = subprocess.run([sys.executable, "-c", EXITING_CHILD, str(out), mode], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout.endswith("buffered, not yet flushed")  # DeepSpeed may print before it
    assert (tmp_path / "child.thread").read_text() == "done"
    assert (tmp_path / "child.atexit").read_text() == "ran"
