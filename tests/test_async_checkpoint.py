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


# `seedlm train ARGS` whose disk takes 50 ms per write call: an O_DIRECT write of the test's ~60 MB would
# otherwise be done in tens of milliseconds, before a loaded machine's poll could see it start
ON_A_SLOW_DISK = """
import sys, time
from seedlm.launch import direct_write
from seedlm.launch.cli import main
write_all = direct_write.DirectFile.write_all
direct_write.DirectFile.write_all = lambda file, data: (time.sleep(0.05), write_all(file, data))[1]
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_a_kill_during_a_background_write_keeps_latest_on_the_previous_checkpoint(tmp_path):
    corpus, tok = write_tiny_corpus_and_tokenizer(tmp_path)
    run = tmp_path / "run"
    # ~60 MB of weights and Adam moments: the step-4 write is still running when the kill lands
    args = ["gated_moe_tiny", *tiny_run_overrides(corpus, tok, output_dir=run, max_steps=100, save_interval=2,
                                                  **{"train.eval_interval": 0, "model_overrides.hidden_size": 256,
                                                     "model_overrides.num_experts": 16})]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", ON_A_SLOW_DISK, *args], cwd=REPO, env=env,
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


def test_the_host_copies_are_page_aligned_and_written_with_o_direct(tmp_path):
    """What the background writer writes (launch/direct_write.py): torch.load reads it back equal, with tied
    tensors still sharing one storage, for aligned and unaligned storages, views, empty and odd-sized tensors.
    The aligned storages reach the disk without the bounce buffer."""
    from seedlm.launch import direct_write
    from seedlm.launch.checkpoint import HostStaging, host_copy

    weight = torch.randn(1000, 257)  # not a multiple of the block size
    state = {"embed": weight, "lm_head": weight, "head": weight[3:10], "small": torch.arange(3),
             "empty": torch.empty(0), "moments": [torch.randn(1 << 20), torch.randn(7)], "step": 12, "name": "x"}
    staging = HostStaging()
    staging.start_save()
    copy = host_copy(state, staging)
    assert all(b.data_ptr() % direct_write.BLOCK == 0 for b in staging.buffers if b.nbytes())
    sizes = []
    original = direct_write.DirectFile.write_all

    def write_all(file, data):
        sizes.append((len(data), direct_write.address(data) == direct_write.address(file.bounce)))
        original(file, data)

    direct_write.DirectFile.write_all = write_all
    try:
        direct_write.save_direct(copy, tmp_path / "state.pt")
    finally:
        direct_write.DirectFile.write_all = original
    probe = direct_write.DirectFile(tmp_path / "probe")
    probe.close()
    if probe.direct:  # this filesystem takes O_DIRECT (ext4 and tmpfs here); otherwise all goes through the bounce
        assert (4 << 20, False) in sizes  # the 4 MiB moment went from its own buffer
    loaded = torch.load(tmp_path / "state.pt", weights_only=False)
    for key, value in flatten(state).items():
        assert (torch.equal(flatten(loaded)[key], value) if isinstance(value, torch.Tensor)
                else flatten(loaded)[key] == value), key
    assert loaded["embed"].untyped_storage().data_ptr() == loaded["lm_head"].untyped_storage().data_ptr()
    assert (tmp_path / "state.pt").stat().st_size % direct_write.BLOCK != 0  # truncated to its real size


def test_parts_of_a_flat_buffer_are_copied_compactly_and_written_without_the_rest(tmp_path):
    """DeepSpeed's ZeRO parameters are views of one flat buffer, and a background save skips the engine's clone
    of them (CollectingCheckpointEngine.preserves_storage_sharing): host_copy copies each view's bytes alone,
    so the file holds the parameters, not the flat buffer once per parameter; a tied view stays one tensor."""
    from seedlm.launch.checkpoint import CollectingCheckpointEngine, HostStaging, host_copy
    from seedlm.launch.direct_write import save_direct

    flat = torch.randn(1 << 20)  # 4 MiB
    state = {"embed": flat[:1000].view(10, 100), "lm_head": flat[:1000].view(10, 100),
             "norm": flat[1000:1100], "transposed": flat[2000:2600].view(20, 30).t(), "moments": [torch.ones(5)]}
    staging = HostStaging()
    staging.start_save()
    copy = host_copy(state, staging)
    assert copy["embed"] is copy["lm_head"]
    assert sum(b.nbytes() for b in staging.buffers) == 4 * (1000 + 100 + 600 + 5)
    flat.add_(1.0)  # training goes on
    save_direct(copy, tmp_path / "state.pt")
    assert (tmp_path / "state.pt").stat().st_size < 64 << 10  # the 4 MiB buffer is not in the file
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    for key in ("embed", "norm", "transposed"):
        assert torch.equal(loaded[key] + 1.0, state[key]), key
    assert loaded["embed"].untyped_storage().data_ptr() == loaded["lm_head"].untyped_storage().data_ptr()
    assert not CollectingCheckpointEngine(staging).preserves_storage_sharing()  # DeepSpeed does not clone first
    assert CollectingCheckpointEngine(None).preserves_storage_sharing()  # a synchronous save: it does


def test_old_checkpoints_are_renamed_at_once_and_deleted_in_the_background(tmp_path):
    """A checkpoint being pruned is never a resume candidate, even half deleted; what an interrupted prune
    left is deleted by the next one."""
    from seedlm.launch.checkpoint import complete_checkpoints, find_resume_checkpoint, prune, write_manifest

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        folder = root / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "rank_00000.pt").write_bytes(b"x" * 100)
        write_manifest(folder)
    (root / "step_00000000.pruned").mkdir()  # left by a prune that was killed
    thread = prune(root, keep_last=1, background=True)
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000006"]  # at once, before the deletion
    thread.join()
    assert sorted(p.name for p in root.iterdir()) == ["step_00000006"]
    (root / "step_00000006").rename(root / "step_00000006.pruned")
    assert find_resume_checkpoint(root) is None


def test_copy_bytes_is_an_exact_copy_on_every_path():
    """launch/host_memory.copy_bytes: glibc's memmove split over threads (large), in the calling thread (small), or
    torch's copy_ (strided, another dtype); pieces of a copy whose size is no multiple of the threads or pages."""
    from seedlm.launch.host_memory import THREADED_COPY_MIN_BYTES, copy_bytes

    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            flat = torch.randn(THREADED_COPY_MIN_BYTES // 4 + 3001)
            cases = [flat, flat[7:], flat[:100], flat[:0], flat.view(-1, 1)[:1000].expand(1000, 3),
                     torch.randn(64, 65).t()]
            for src in cases:
                dst = torch.full(src.shape, float("nan"))
                assert copy_bytes(dst, src) is dst
                assert torch.equal(dst, src)
            dst = torch.zeros(1000, dtype=torch.float64)
            copy_bytes(dst, flat[:1000])
            assert torch.equal(dst, flat[:1000].double())
    finally:
        torch.set_num_threads(threads)
