"""`seedlm export`, `seedlm push` and their help: an export of a real tiny run loads with every Auto class
without seedlm, its files (and the checkpoints' hf/ folders) get the umask's mode, push without a token
refuses before any network, and every option says what it does. Export streams the weights from ds/: the
same tensors as the consolidated hf/ folder from ZeRO-3 and expert-parallel checkpoints, with a peak memory
of about two shards for a model many shards large, and `seedlm eval` of a run without hf/ exports it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seedlm.launch.cli import build_parser
from seedlm.launch.cli import main as seedlm
from seedlm.launch.export import use_umask_file_modes
from tests.helpers import (
    file_modes,
    load_with_every_auto_class_without_seedlm,
    reference_outputs,
    tiny_run_overrides,
    umask_set_to,
    write_tiny_corpus_and_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step gated-MoE run (one checkpoint), trained once under umask 022 for the tests below."""
    root = tmp_path_factory.mktemp("export_run")
    corpus, tok = write_tiny_corpus_and_tokenizer(root)
    overrides = tiny_run_overrides(corpus, tok, output_dir=root / "run", max_steps=2, save_interval=2,
                                   **{"train.eval_interval": 0, "train.hf_interval": 2})
    with umask_set_to(0o022):
        assert seedlm(["train", "gated_moe_tiny", *overrides]) == 0
    return root / "run"


def test_export_of_a_run_loads_with_every_auto_class_without_seedlm(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    assert seedlm(["export", str(tiny_run), str(tmp_path / "export")]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    # seedlm's own model of the checkpoint the export was made from
    reference = AutoModelForCausalLM.from_pretrained(tiny_run / "checkpoints" / "step_00000002" / "hf").eval()
    outputs = reference_outputs(reference, torch.randint(0, 512, (2, 12)))
    ok = load_with_every_auto_class_without_seedlm([(tmp_path / "export", outputs, True)], tmp_path)
    assert [line.split()[2:] for line in ok] == [["GatedMoeConfig", "GatedMoeModel", "GatedMoeForCausalLM"]]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"])
def test_every_exported_file_gets_the_umask_mode(tiny_run, tmp_path, umask, mode):
    with umask_set_to(umask):
        assert seedlm(["export", str(tiny_run), str(tmp_path / "export")]) == 0
    modes = file_modes(tmp_path / "export")
    assert "model.safetensors" in modes and "config.json" in modes and "README.md" in modes
    assert {name: oct(m) for name, m in modes.items() if m != mode} == {}


def test_checkpoint_hf_folders_get_the_umask_mode(tiny_run):
    modes = file_modes(tiny_run / "checkpoints" / "step_00000002" / "hf")  # written under umask 022
    assert "model.safetensors" in modes
    assert {name: oct(m) for name, m in modes.items() if m != 0o644} == {}


def test_use_umask_file_modes_changes_modes_only(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, text in [("weights.bin", "w"), ("sub/config.json", "{}")]:
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o600)
    with umask_set_to(0o027):
        use_umask_file_modes(tmp_path)
        assert os.umask(0o027) == 0o027  # the umask itself is left as it was
    assert file_modes(tmp_path) == {"weights.bin": 0o640, "sub/config.json": 0o640}
    assert (tmp_path / "weights.bin").read_text() == "w" and (tmp_path / "sub/config.json").read_text() == "{}"


def test_push_without_a_token_refuses_before_any_network(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"0" * 10)
    # a fresh HF_HOME holds no login cache; offline, any Hub call would fail with another message
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "seedlm.launch.cli", "push", str(folder), "someone/tiny"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "seedlm push: no Hugging Face token: set HF_TOKEN or run `hf auth login` (huggingface_hub's CLI), "
        "then push again"
    )
    assert "huggingface-cli" not in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("command", ["export", "convert", "push"])
def test_every_option_has_help_text(command):
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    parser = subparsers.choices[command]
    undocumented = [a.option_strings or a.dest for a in parser._actions if a.dest != "help" and not a.help]
    assert undocumented == []
    assert parser.format_help().count("\n") > 5


def export_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {name: tensor for f in files for name, tensor in load_file(folder / f).items()}


def peak_rss_of_export(run: Path, out: Path, max_shard_size: str) -> int:
    """Peak resident memory (bytes) of a fresh process running `seedlm export` (from /proc: VmHWM)."""
    script = (f"from seedlm.launch.export import export_run; export_run({str(run)!r}, {str(out)!r}, "
              f"max_shard_size={max_shard_size!r}); "
              "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split()[-1]) * 1024


def test_export_streams_a_zero3_checkpoint_with_a_peak_of_about_two_shards(tmp_path):
    """A ZeRO-3 run of a ~100 MB model, exported in 4 MB shards: the same tensors as its hf/ folder, and the
    export's peak memory above an export of a 2 MB model is a few shards, not the model."""
    corpus, tok = write_tiny_corpus_and_tokenizer(tmp_path)
    big = {"model_overrides.hidden_size": 256, "model_overrides.num_hidden_layers": 8,
           "model_overrides.moe_intermediate_size": 256, "model_overrides.num_experts": 16}
    runs = {}
    for name, fields in [("small", {"model_overrides.num_hidden_layers": 1}), ("big", big)]:
        runs[name] = tmp_path / name
        overrides = tiny_run_overrides(corpus, tok, output_dir=runs[name], max_steps=1, save_interval=1,
                                       zero_stage=3, **{"train.eval_interval": 0, "train.hf_interval": 1, **fields})
        assert seedlm(["train", "gated_moe_tiny", *overrides]) == 0
    checkpoint = runs["big"] / "checkpoints" / "step_00000001"
    assert not list((checkpoint / "ds").glob("mp_rank_*"))  # ZeRO-3's layout: parameters only in rank partitions
    peaks = {name: peak_rss_of_export(run, tmp_path / f"export_{name}", "4MB") for name, run in runs.items()}
    exported, reference = export_weights(tmp_path / "export_big"), export_weights(checkpoint / "hf")
    reference.pop("lm_head.weight")  # ZeRO-3's gathered hf/ keeps the tied head; save_pretrained drops it
    assert sorted(exported) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name
    model_bytes = sum(t.numel() * t.element_size() for t in exported.values())
    shards = list((tmp_path / "export_big").glob("model-*.safetensors"))
    assert model_bytes > 80e6 and len(shards) > 20
    largest = max(t.numel() * t.element_size() for t in exported.values())
    assert peaks["big"] - peaks["small"] < 3 * 4e6 + 2 * largest + 16e6, (peaks, model_bytes, largest)


@pytest.mark.slow
def test_export_of_an_expert_parallel_run_equals_its_gathered_hf_folder(tmp_path):
    """2 ranks, EP 2, ZeRO 2: ds/ holds rank 0's expert slices in the module file and every rank's slices only
    as fp32 fragments of the ZeRO partitions; the export equals the hf/ folder gathered at save time."""
    from seedlm.launch.distributed import free_port

    corpus, tok = write_tiny_corpus_and_tokenizer(tmp_path)
    overrides = tiny_run_overrides(corpus, tok, output_dir=tmp_path / "run", max_steps=2, save_interval=2,
                                   zero_stage=2, expert_parallel_size=2,
                                   **{"train.eval_interval": 0, "train.hf_interval": 2})
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "seedlm.launch.cli",
                             "train", "gated_moe_tiny", *overrides], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert seedlm(["export", str(tmp_path / "run"), str(tmp_path / "export"), "--max-shard-size", "1MB"]) == 0
    exported = export_weights(tmp_path / "export")
    reference = export_weights(tmp_path / "run" / "checkpoints" / "step_00000002" / "hf")
    assert exported["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 8  # all experts, from both ranks
    assert sorted(exported) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name


def test_eval_of_a_run_without_hf_exports_it_from_ds(tmp_path):
    """hf_interval 0 (the default): checkpoints hold no hf/; resolve_model_dir (seedlm eval, lm-eval) exports
    the checkpoint's ds/ once into <run>/exports/ and loads that; a second call reuses it."""
    from transformers import AutoModelForCausalLM

    from seedlm.launch.checkpoint import resolve_model_dir

    corpus, tok = write_tiny_corpus_and_tokenizer(tmp_path)
    overrides = tiny_run_overrides(corpus, tok, output_dir=tmp_path / "run", max_steps=2, save_interval=2,
                                   **{"train.eval_interval": 0})
    assert seedlm(["train", "gated_moe_tiny", *overrides]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert not (checkpoint / "hf").exists() and (checkpoint / "model" / "config.json").is_file()
    folder = resolve_model_dir(tmp_path / "run")
    assert folder == tmp_path / "run" / "exports" / "step_00000002"
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(tmp_path / "run") == folder  # exported once, then reused
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    net = AutoModelForCausalLM.from_pretrained(folder).eval()
    ds_state = torch.load(checkpoint / "ds" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, ds_state[name]), name
