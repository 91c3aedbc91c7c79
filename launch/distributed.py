"""Process-group setup for `seedlm train`: one process, torchrun, the deepspeed launcher or srun.

Rank and world size come from the environment: torchrun and the deepspeed launcher set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; under srun we translate SLURM_PROCID,
SLURM_NTASKS and SLURM_LOCALID, take MASTER_ADDR from the first host of SLURM_JOB_NODELIST and
MASTER_PORT from the job id. A plain `seedlm train` is a world of one on 127.0.0.1.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import NoReturn

import torch


class PeerFailure(RuntimeError):
    """This rank stopped because another rank (or the launcher) ended the job: its own error is a consequence
    (a collective that lost its peer, a DataLoader worker terminated with it), not the cause."""

    def __init__(self, rank: int, signal_name: str | None, error: BaseException, last_checkpoint):
        cause = f"the launcher sent {signal_name}" if signal_name else "a collective lost its peers"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        kept = f"the last complete checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
        super().__init__(
            f"rank {rank} stopped because another rank failed first ({cause}; this rank then saw: {first_line}). "
            "The launcher's summary names the rank that failed first (torchrun: 'Root Cause'; srun: the first "
            f"task with an error); {kept}, and the same command resumes from it."
        )


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("node[1-2]" -> "node1"), via scontrol when available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        head = nodelist.split(",")[0]
        if "[" in head:  # node[1-2,5] -> node1
            prefix, rest = head.split("[", 1)
            return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
        return head


def detect_launcher(env=os.environ) -> str:
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun/deepspeed"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return "srun"
    return "single"


def setup_environment(env=os.environ) -> str:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for torch.distributed from the launcher."""
    launcher = detect_launcher(env)
    if launcher == "srun":
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    elif launcher == "single":
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = "0", "1", "0"
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")
    return launcher


_started_here = False  # init_distributed started the process group in this process (see exit_process)


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on CUDA)."""
    global _started_here
    import deepspeed

    launcher = setup_environment()
    rank, world_size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        # modulo: sites that give each task one visible GPU (--gpus-per-task=1) still set SLURM_LOCALID > 0
        gpu = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(gpu)
        device, backend = torch.device("cuda", gpu), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        atexit.register(destroy_process_group)
        _started_here = True
    return DistInfo(rank, world_size, local_rank, device, backend, launcher)


def destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """Exit with `code` as Python would, but without the interpreter's final teardown once torch.distributed ran.

    After a DeepSpeed run the gloo process groups outlive destroy_process_group and gc.collect (their worker
    threads were still running after both, ZeRO-3 on 2 ranks): they are freed in the interpreter's teardown,
    and a worker thread that wants the GIL then aborts the process ("terminate called without an active
    exception", exit -6) after a run that succeeded, 1 run in 2-4 of `bench_startup_memory.py --smoke` in CI.
    So: join the non-daemon threads and run the atexit handlers (which destroy the group and flush the logs)
    as the interpreter would, flush stdout and stderr, then leave with os._exit.
    """
    if not _started_here:
        sys.exit(code)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code)


def all_ranks_true(flag: bool) -> bool:
    """True when flag holds on every rank (a single process needs no communication)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    torch.distributed.all_reduce(t)
    return t.item() == 0.0


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
