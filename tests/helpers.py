"""Shared test helpers."""

import os
import subprocess
import sys
import textwrap

BLOCK_SEEDLM = """
import importlib.abc, sys
class BlockSeedlm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('model', 'launch', 'data_pipeline', 'eval'):
            raise ImportError('seedlm is not installed here: ' + name)
sys.meta_path.insert(0, BlockSeedlm())
"""


def run_without_seedlm(script: str, cwd) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter in which no seedlm package can be imported (as on a machine
    that has only torch, transformers and safetensors), with its own transformers module cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(cwd / "hf_modules")
    return subprocess.run(
        [sys.executable, "-c", BLOCK_SEEDLM + textwrap.dedent(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
