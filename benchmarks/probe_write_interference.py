"""How much a disk write slows the CPU's compute on this machine: a 2-thread matmul loop runs before, during and
after O_DIRECT writes of --gb GB (a separate process, 8 MiB writes, fsync at the end), at full speed and
rate-limited, in --rounds rounds. Prints the loop's median iteration before / during / after and the compute
lost per GB written: (during / mean(before, after) - 1) x the write's seconds / GB.

Why: on the AMD EPYC VM of 2026-12-01 a background checkpoint save slowed the training steps it overlapped
1.5x while its writer thread used 0.2 s of CPU (README, Checkpoint saves). If the loss per GB were lower at a
lower write rate, the background writer could pace itself; this measures whether it is.

    python benchmarks/probe_write_interference.py --dir /path/on/the/checkpoint/disk   # ~3 minutes
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

WRITER = r"""
import mmap, os, sys, time
path, rate, total = sys.argv[1], float(sys.argv[2]) * 1e6, float(sys.argv[3]) * 1e9  # rate 0: full speed
buf = mmap.mmap(-1, 8 << 20)  # page-aligned, as O_DIRECT wants
buf.write(b"\1" * (8 << 20))
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
start, done = time.perf_counter(), 0
while done < total:
    os.write(fd, buf)
    done += 8 << 20
    ahead = done / rate - (time.perf_counter() - start) if rate else 0
    if ahead > 0:
        time.sleep(ahead)
os.fsync(fd)
os.close(fd)
"""


def loop_ms(a, b, seconds: float) -> float:
    """Median ms of 10 [1024, 1024] matmuls over `seconds`."""
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path.cwd(), help="where to write (the disk checkpoints go to)")
    p.add_argument("--gb", type=float, default=2.0, help="GB per write")
    p.add_argument("--rates", type=float, nargs="+", default=[0, 150, 60], help="MB/s; 0 = full speed")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    if not args.dir.is_dir():
        p.error(f"--dir {args.dir}: no such folder")
    import torch

    torch.set_num_threads(2)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    target = args.dir / "probe_write_interference.bin"
    try:
        for round_ in range(args.rounds):
            for rate in args.rates:
                before = loop_ms(a, b, 3)
                start = time.perf_counter()
                writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(rate), str(args.gb)])
                during = []
                while writer.poll() is None:
                    during.append(loop_ms(a, b, 0.5))
                seconds = time.perf_counter() - start
                if writer.returncode != 0:
                    print(f"the writer failed (exit {writer.returncode}); O_DIRECT on {args.dir}?", file=sys.stderr)
                    return 1
                after = loop_ms(a, b, 2)
                target.unlink()
                mid = sorted(during)[len(during) // 2]
                lost = (mid / ((before + after) / 2) - 1) * seconds / args.gb
                label = "full speed" if rate == 0 else f"{rate:g} MB/s"
                print(f"round {round_} O_DIRECT {label:>10}: {seconds:5.1f} s ({args.gb / seconds:.2f} GB/s); loop "
                      f"ms before {before:.0f}, during {mid:.0f}, after {after:.0f}; compute lost {lost:.2f} s "
                      "per GB written", flush=True)
                time.sleep(3)
    finally:
        target.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
