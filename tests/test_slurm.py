"""slurm/train.sbatch on a real two-node SLURM cluster started on this machine (slurm/local_cluster.sh):
ranks on both nodes, expert parallelism across nodes, USR1 -> checkpoint -> requeue -> exact resume,
and jobs that must not be requeued (a refused config, the requeue cap).

All jobs are submitted at once by a module fixture (they share the 2 CPUs; the requeued job's wait for
its new start overlaps with the others' work), and each test then waits for its own job.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import tiny_run_overrides, write_tiny_corpus_and_tokenizer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
SBATCH = REPO / "slurm" / "train.sbatch"
MAX_STEPS = 60  # ~0.1 s a step alone: long enough that a USR1 sent after step 2 lands mid-run
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The local cluster in its own folder and ports (a cluster someone started by hand is left alone)."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (apt-get install, /etc/hosts, daemons as root)")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    folder = tmp_path_factory.mktemp("slurm")
    ctld, node1, node2 = free_ports(3)
    env = dict(os.environ, SEEDLM_SLURM_DIR=str(folder), SEEDLM_SLURMCTLD_PORT=str(ctld),
               SEEDLM_SLURMD_PORT1=str(node1), SEEDLM_SLURMD_PORT2=str(node2))
    started = subprocess.run([str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=900)
    if started.returncode == 4:  # the script's code for "cannot install SLURM here"
        pytest.skip(f"cannot install SLURM: {started.stderr.strip()[-500:]}")
    try:
        assert started.returncode == 0, started.stderr[-4000:]
        env["SLURM_CONF"] = str(folder / "etc" / "slurm.conf")
        yield env
    finally:
        stopped = subprocess.run([str(CLUSTER), "stop"], env=env, capture_output=True, text=True, timeout=300)
        assert stopped.returncode == 0, stopped.stderr
    # stop ended every daemon whose pid it had recorded
    assert not list((folder / "run").glob("*.pid"))


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    return write_tiny_corpus_and_tokenizer(tmp_path_factory.mktemp("slurm_corpus"))


def overrides(corpus, tok, **extra) -> list[str]:
    return tiny_run_overrides(corpus, tok, **{"train.max_steps": MAX_STEPS, "train.save_interval": 30,
                                             "train.eval_interval": 0, **extra})


def sbatch(env, logs: Path, name: str, args: list[str], *options: str, script: Path = SBATCH, **extra_env) -> int:
    job_env = dict(env, SEEDLM_HOME=str(REPO), SEEDLM_PYTHON=sys.executable, PYTHONPATH=str(REPO), **extra_env)
    cmd = ["sbatch", "--parsable", "-N", "2", "-J", name, "-o", f"{logs}/%x-%j.out", *options, str(script),
           "gated_moe_tiny", *args]
    out = subprocess.run(cmd, cwd=REPO, env=job_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().split(";")[0])


def job_info(env, job: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_for_job(env, job: int, timeout: float = 420) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(env, job)
        if info["JobState"] in TERMINAL:
            return info
        time.sleep(1)
    subprocess.run(["scancel", str(job)], env=env, timeout=30)
    raise AssertionError(f"job {job} still {info['JobState']} after {timeout} s")


def wait_until(check, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def node_ids(log: str) -> set[str]:
    return set(re.findall(r"task rank=\d+ node=\S+ nodeid=(\d+)", log))


@pytest.fixture(scope="module")
def jobs(cluster, corpus_and_tokenizer, tmp_path_factory):
    """Submits every job of the module, sends the USR1s, and returns where everything is."""
    corpus, tok = corpus_and_tokenizer
    root = tmp_path_factory.mktemp("slurm_runs")
    logs = root / "logs"
    logs.mkdir()
    j = {"root": root, "logs": logs}
    j["reference"] = sbatch(cluster, logs, "reference", overrides(corpus, tok, output_dir=root / "reference"))
    j["interrupted"] = sbatch(cluster, logs, "interrupted", overrides(corpus, tok, output_dir=root / "interrupted"))
    j["ep"] = sbatch(cluster, logs, "ep", overrides(corpus, tok, output_dir=root / "ep", max_steps=4, save_interval=4,
                                                    expert_parallel_size=2))
    ds_args = overrides(corpus, tok, output_dir=root / "deepspeed", max_steps=4, save_interval=4)
    j["deepspeed"] = sbatch(cluster, logs, "deepspeed", ds_args, script=REPO / "slurm" / "train_deepspeed.sbatch")
    # a mistake in the config: refused before any compute, must fail once and not come back
    j["refused"] = sbatch(cluster, logs, "refused", overrides(corpus, tok, output_dir=root / "refused",
                                                              **{"train.lrr": 1}))
    # no output_dir: the run folder is named after the job; no requeue allowed, so USR1 ends it
    j["capped"] = sbatch(cluster, logs, "capped", overrides(corpus, tok), SEEDLM_RUNS_DIR=str(root / "runs"),
                         SEEDLM_MAX_REQUEUES="0")

    # USR1 to the batch shell, as --signal=B:USR1@N does before a time limit, once training is under way
    interrupted_run = root / "interrupted"
    wait_until(lambda: logged_steps(interrupted_run) >= 2, "the interrupted job to log 2 steps")
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(j["interrupted"])], env=cluster, check=True,
                   timeout=30)
    j["signalled_after"] = logged_steps(interrupted_run)

    capped_log = logs / f"capped-{j['capped']}.out"
    wait_until(lambda: capped_log.exists() and "attempt 1" in capped_log.read_text(), "the capped job to start")
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(j["capped"])], env=cluster, check=True, timeout=30)
    return j


def log_of(jobs, name: str) -> str:
    return (jobs["logs"] / f"{name}-{jobs[name]}.out").read_text()


def test_two_node_job_runs_a_rank_on_each_node(cluster, jobs):
    info = wait_for_job(cluster, jobs["reference"])
    log = log_of(jobs, "reference")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["Restarts"] == "0" and info["NumNodes"] == "2"
    assert node_ids(log) == {"0", "1"}, log[-4000:]
    assert re.search(r"master node1:\d+", log)  # the first host of the node list
    assert f"finished at step {MAX_STEPS} (max_steps)" in log
    run = jobs["root"] / "reference"
    assert sorted(losses(run)) == list(range(1, MAX_STEPS + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{MAX_STEPS:08d}"
    state = json.loads((run / "checkpoints" / f"step_{MAX_STEPS:08d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2


def test_usr1_saves_requeues_and_resumes_to_the_same_loss(cluster, jobs):
    info = wait_for_job(cluster, jobs["interrupted"])
    log = log_of(jobs, "interrupted")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["Restarts"] == "1", log[-4000:]
    stopped = re.search(r"finished at step (\d+) \(signal SIGUSR1\)", log)
    assert stopped, log[-4000:]
    step = int(stopped.group(1))
    assert jobs["signalled_after"] <= step < MAX_STEPS
    assert "requeueing job" in log and "attempt 2" in log
    assert re.search(rf"resumed from \S+step_{step:08d} at step {step}\b", log), log[-4000:]
    assert f"finished at step {MAX_STEPS} (max_steps)" in log
    attempts = log.split("attempt 2")
    assert node_ids(attempts[0]) == {"0", "1"} and node_ids(attempts[1]) == {"0", "1"}
    run = jobs["root"] / "interrupted"
    # the signal's checkpoint (later pruned by train.keep_last once newer ones exist)
    assert re.search(rf"saved checkpoint \S+step_{step:08d}\n", attempts[0]), log[-4000:]
    # wait for the reference run too: same seed, data and schedule, so the same numbers, exactly
    wait_for_job(cluster, jobs["reference"])
    expected, got = losses(jobs["root"] / "reference"), losses(run)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    assert got[MAX_STEPS] == expected[MAX_STEPS]
    assert got == expected


def test_expert_parallel_job_across_two_nodes(cluster, jobs):
    info = wait_for_job(cluster, jobs["ep"])
    log = log_of(jobs, "ep")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert node_ids(log) == {"0", "1"}, log[-4000:]
    assert "finished at step 4 (max_steps)" in log
    run = jobs["root"] / "ep"
    state = json.loads((run / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["expert_parallel_size"] == 2
    assert sorted(losses(run)) == [1, 2, 3, 4]


def test_deepspeed_launcher_variant_across_two_nodes(cluster, jobs):
    info = wait_for_job(cluster, jobs["deepspeed"])
    log = log_of(jobs, "deepspeed")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert node_ids(log) == {"0", "1"}, log[-4000:]  # one DeepSpeed launcher per node
    run = jobs["root"] / "deepspeed"
    hostfile = run / "slurm" / f"hostfile-{jobs['deepspeed']}"
    assert hostfile.read_text().split("\n")[:2] == ["node1 slots=1", "node2 slots=1"]
    assert "node_rank=0" in log and "node_rank=1" in log
    state = json.loads((run / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and sorted(losses(run)) == [1, 2, 3, 4]


def test_refused_config_fails_once_without_requeue(cluster, jobs):
    info = wait_for_job(cluster, jobs["refused"])
    log = log_of(jobs, "refused")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log[-4000:]
    assert info["Restarts"] == "0"
    assert "did you mean 'lr'" in log and "not requeued" in log


def test_requeue_cap_and_run_folder_from_job_name(cluster, jobs):
    info = wait_for_job(cluster, jobs["capped"])
    log = log_of(jobs, "capped")
    assert f"run folder {jobs['root'] / 'runs' / 'capped'};" in log
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log[-4000:]
    assert "received SIGUSR1" in log and "not requeued" in log and "SEEDLM_MAX_REQUEUES=0" in log


def test_scripts_answer_help():
    for script in (CLUSTER, SBATCH, REPO / "slurm" / "train_deepspeed.sbatch"):
        out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "sbatch" in out.stdout, (script, out.stdout, out.stderr)
