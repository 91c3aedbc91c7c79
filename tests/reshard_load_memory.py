"""Worker for tests/test_reshard.py's memory test, run under torchrun: `seedlm train ARGS` with
launch/reshard.py's load_resharded wrapped to record this rank's peak resident memory while it loads.

    python -m torch.distributed.run --nproc_per_node=2 tests/reshard_load_memory.py OUT_PREFIX MODEL KEY=VALUE...

Each rank writes OUT_PREFIX.<rank>.json: its resident set before the load and its peak during it (VmRSS, and
VmHWM after resetting it through /proc/self/clear_refs), in bytes."""

from __future__ import annotations

import json
import os
import sys


def memory(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> int:
    import seedlm.launch.reshard as reshard
    from seedlm.launch.cli import main as seedlm

    out_prefix, args = sys.argv[1], sys.argv[2:]
    load = reshard.load_resharded

    def measured(*a, **kw):
        before = memory("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set (VmHWM) to now
            f.write("5")
        load(*a, **kw)
        record = {"rss_before": before, "peak": memory("VmHWM")}
        with open(f"{out_prefix}.{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump(record, f)

    reshard.load_resharded = measured
    return seedlm(["train", *args])


if __name__ == "__main__":
    from seedlm.launch.distributed import exit_process

    exit_process(main())  # as `seedlm train` exits (launch.cli.console_main)
