"""One installed namespace: the wheel holds only seedlm/ (presets and tasks included) and its dist-info, and a
non-editable install runs from a folder whose own model.py, eval.py, launch.py and data_pipeline.py would
shadow generic top-level packages."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DECOYS = ("model", "eval", "launch", "data_pipeline")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("seedlm-*.whl")
    return path


def test_the_wheel_holds_only_the_seedlm_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"seedlm", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for needed in ("seedlm/__init__.py", "seedlm/model/modeling_gated_moe.py", "seedlm/launch/trainer.py",
                   "seedlm/launch/commands/train.py", "seedlm/eval/tasks/tiny_qa.yaml",
                   "seedlm/eval/tasks/data/tiny_qa_test.jsonl", "seedlm/data_pipeline/loader.py",
                   "seedlm/configs/quickstart.yaml", "seedlm/configs/models/gated_moe_15a2b.yaml",
                   "seedlm/configs/state_tracking/s3_nh2_neg.yaml",
                   "seedlm/configs/paper/gated_attention/elementwise.yaml",
                   "seedlm/configs/paper/negative_eigenvalues/parity_nh1_neg.yaml",
                   "seedlm/configs/state_tracking/s5_nh4_neg.yaml"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("seedlm/tests", "seedlm/benchmarks"))]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "seedlm = seedlm.launch.cli:console_main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_an_installed_wheel_runs_beside_decoy_modules(wheel, tmp_path):
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                             str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    work = tmp_path / "my_project"
    work.mkdir()
    for name in DECOYS:  # a user's own scripts, named like the generic packages seedlm once installed
        (work / f"{name}.py").write_text(f"raise SystemExit('the decoy {name}.py was imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    script = (
        "import seedlm, sys; from pathlib import Path\n"
        f"assert Path(seedlm.__file__).is_relative_to({str(site)!r}), seedlm.__file__\n"
        "from seedlm.model import GatedMoeConfig, DeltaProductConfig, chunk_delta_product, recurrent_delta_product\n"
        "from transformers import AutoConfig\n"
        "assert AutoConfig.for_model('seedlm_deltaproduct').__class__ is DeltaProductConfig\n"
        "from seedlm.launch.cli import main\n"
        "sys.exit(main(['train', 'quickstart', '--print-config']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decoy" not in result.stderr
    assert result.stdout.startswith("model: gated_moe_tiny") and "- stdlib" in result.stdout  # the packaged preset
