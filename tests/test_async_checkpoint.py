"""Background checkpoint saves (launch/checkpoint.py CheckpointSaver): a process killed while its writer
thread is writing leaves `latest` on the previous complete checkpoint and the run resumes from it; a
background save holds exactly what a synchronous one holds."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from seedlm.launch.cli import main as seedlm
from tests.helpers import tiny_run_overrides, write_tiny_corpus_and_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_a_kill_during_a_background_write_keeps_latest_on_the_previous_checkpoint(tmp_path):
    corpus, tok = write_tiny_corpus_and_tokenizer(tmp_path)
    run = tmp_path / "run"
    # ~60 MB of weights and Adam moments: the step-4 write is still running when the kill lands
    args = ["gated_moe_tiny", *tiny_run_overrides(corpus, tok, output_dir=run, max_steps=100, save_interval=2,
                                                  **{"train.eval_interval": 0, "model_overrides.hidden_size": 256,
                                                     "model_overrides.num_experts": 16})]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "seedlm.launch.cli", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    writing = run / "checkpoints" / "step_00000004.tmp" / "ds"
    try:
        while not (writing.is_dir() and any(writing.iterdir())):  # the writer thread has opened its first file
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert not (root / "step_00000004").exists() and not (root / "step_00000004.tmp" / "manifest.json").exists()
    # the same command resumes from step 2, with the step-4 leftovers cleared by its own step-4 save
    resumed = [a if not a.startswith("max_steps=") else "max_steps=5" for a in args]
    assert seedlm(["train", *resumed]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-3:] == [3, 4, 5]  # steps 3-5 again, after step 2
    assert (root / "latest").read_text().strip() == "step_00000005"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000005"]


def test_a_background_save_holds_what_a_synchronous_save_holds(tmp_path):
    corpus, tok = write_tiny_corpus_and_tokenizer(tmp_path)
    folders = {}
    for mode in ("true", "false"):
        run = tmp_path / mode
        assert seedlm(["train", "gated_moe_tiny", *tiny_run_overrides(
            corpus, tok, output_dir=run, max_steps=4, save_interval=2,
            **{"train.eval_interval": 0, "train.async_save": mode})]) == 0
        root = run / "checkpoints"
        assert (root / "latest").read_text().strip() == "step_00000004"
        folders[mode] = root / "step_00000004"
    files = {mode: sorted(str(p.relative_to(f)) for p in f.rglob("*") if p.is_file()) for mode, f in folders.items()}
    assert files["true"] == files["false"] and "ds/mp_rank_00_model_states.pt" in files["true"]
    for name in ("ds/mp_rank_00_model_states.pt", "rank_00000.pt"):
        background, synchronous = (torch.load(folders[m] / name, weights_only=False) for m in ("true", "false"))
        flat_b, flat_s = flatten(background), flatten(synchronous)
        assert sorted(flat_b) == sorted(flat_s), name
        for key, value in flat_s.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(flat_b[key], value), (name, key)
    states = [json.loads((folders[m] / "trainer_state.json").read_text()) for m in ("true", "false")]
    assert states[0] == states[1]


def flatten(obj, prefix="") -> dict:
    """Every tensor (and plain value) of a nested state, by its path."""
    if isinstance(obj, dict):
        return {k: v for key, item in obj.items() for k, v in flatten(item, f"{prefix}{key}/").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, item in enumerate(obj) for k, v in flatten(item, f"{prefix}{i}/").items()}
    return {prefix: obj if isinstance(obj, torch.Tensor) else repr(type(obj))}


def test_the_next_background_save_copies_into_the_previous_saves_host_buffers():
    from seedlm.launch.checkpoint import HostStaging, host_copy

    weight = torch.arange(6.0).reshape(2, 3)
    state = {"embed": weight, "lm_head": weight, "moments": [torch.ones(4)]}  # a tied weight: one storage
    staging = HostStaging()
    staging.start_save()
    first = host_copy(state, staging)
    assert first["embed"].untyped_storage().data_ptr() == first["lm_head"].untyped_storage().data_ptr()
    buffers = [b.data_ptr() for b in staging.buffers]
    assert len(buffers) == 2
    first_on_disk = {k: v.clone() for k, v in flatten(first).items()}  # what the writer wrote
    weight.add_(10.0)  # training goes on; the first copy is not touched until the next save
    assert torch.equal(first["embed"], first_on_disk["embed/"])
    state["moments"][0].mul_(3.0)
    staging.start_save()  # the previous write is done
    second = host_copy(state, staging)
    assert [b.data_ptr() for b in staging.buffers] == buffers  # no new allocation
    assert torch.equal(second["embed"], weight) and torch.equal(second["lm_head"], weight)
    assert torch.equal(second["moments"][0], torch.full((4,), 3.0))
    assert second["lm_head"].untyped_storage().data_ptr() == second["embed"].untyped_storage().data_ptr()
    assert weight.untyped_storage().data_ptr() not in buffers  # copies, never the live tensors
    staging.start_save()  # a state whose storage changed size gets a fresh buffer, not a truncated one
    third = host_copy({"embed": torch.zeros(3, 3), "moments": [torch.ones(4)]}, staging)
    assert third["embed"].shape == (3, 3) and staging.buffers[0].data_ptr() != buffers[0]
    assert staging.buffers[1].data_ptr() == buffers[1]
