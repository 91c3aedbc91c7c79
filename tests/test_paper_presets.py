"""The paper experiments (configs/paper/): the presets of a table differ only in its row, every preset trains,
and `seedlm report` prints the rows from the finished runs (and refuses what it cannot use)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from seedlm.launch.cli import main as seedlm
from seedlm.launch.commands.report import fall_over_last_quarter
from seedlm.launch.config import load_run_config
from seedlm.launch.presets import build_model_config
from tests.helpers import tiny_run_overrides, write_tiny_corpus_and_tokenizer

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
GATE_PRESETS = sorted((PAPER / "gated_attention").glob("*.yaml"))
LENGTH_PRESETS = sorted((PAPER / "length_extrapolation").glob("*.yaml"))
# the same small width for both families (4 heads of 8), so that each preset trains in about a second
TINY_MODEL = {"model_overrides.hidden_size": 32, "model_overrides.head_dim": 8, "model_overrides.intermediate_size": 64,
              "model_overrides.num_hidden_layers": 2}


def load(path: Path) -> dict:
    return load_run_config(path).to_dict()


def test_gate_presets_differ_only_in_the_gate_and_the_lr():
    rows, rest = {}, []
    for path in GATE_PRESETS:
        run = load(path)
        assert run["train"].pop("output_dir") == f"runs/paper/gated_attention/{path.stem}"
        rows[path.stem] = (run["model"].pop("attn_output_gate"), run["train"].pop("lr"))
        saves = run["train"].pop("max_steps"), run["train"].pop("save_interval"), run["train"].pop("keep_last")
        if path.stem.endswith("_lr_high"):  # the stability pair: 400 steps, saved at its end
            assert saves == (400, 400, 2)
        else:  # every 1000 steps, all kept: the sink statistics by step
            assert saves == (4000, 1000, 4)
        assert run["model"]["num_experts"] == 0 and run["data"]["sources"] == ["stdlib"]
        rest.append(run)
    assert rows == {"none": ("none", 3e-3), "headwise": ("headwise", 3e-3), "elementwise": ("elementwise", 3e-3),
                    "none_lr_high": ("none", 3e-2), "elementwise_lr_high": ("elementwise", 3e-2)}
    assert all(r == rest[0] for r in rest)  # same model, data, schedule and seed


def test_length_presets_differ_only_in_the_model_and_are_of_a_size():
    runs = {path.stem: load(path) for path in LENGTH_PRESETS}
    assert set(runs) == {"dp_nh1", "dp_nh2", "dp_nh3", "gated_attention"}
    models = {name: run.pop("model") for name, run in runs.items()}
    for name, run in runs.items():
        assert run["train"].pop("output_dir") == f"runs/paper/length_extrapolation/{name}"
        assert run == runs["dp_nh1"] and run["data"]["seq_len"] == 256
    assert {name: m.pop("num_householder", None) for name, m in models.items()} == {
        "dp_nh1": 1, "dp_nh2": 2, "dp_nh3": 3, "gated_attention": None}
    assert models["dp_nh1"] == models["dp_nh2"] == models["dp_nh3"]
    params = {name: build_model_config(load(PAPER / "length_extrapolation" / f"{name}.yaml")["model"])
              .parameter_counts().total for name in runs}
    assert max(params.values()) < 1.3 * min(params.values()), params


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every paper preset trained for 2 steps on a tiny corpus (the seed-1 twin of `none` too, saving at both
    steps): {name: folder}."""
    root = tmp_path_factory.mktemp("paper")
    corpus, tok = write_tiny_corpus_and_tokenizer(root)
    cache = pytest.MonkeyPatch()
    cache.setenv("SEEDLM_DATA_CACHE", str(root / "data_cache"))  # the gated-attention presets prepare their data
    folders = {}
    jobs = [(p, p.stem, {}) for p in GATE_PRESETS + LENGTH_PRESETS]
    jobs.append((PAPER / "gated_attention" / "none.yaml", "none_seed1", {"train.seed": 1, "train.save_interval": 1}))
    for preset, name, extra in jobs:
        out = root / preset.parent.name / name
        args = tiny_run_overrides(corpus, tok, output_dir=out, max_steps=2, **{
            "train.eval_interval": 2, "train.save_interval": 2, "train.eval_batches": 1, **TINY_MODEL, **extra})
        assert seedlm(["train", str(preset), *args]) == 0, name
        folders[name] = out
    cache.undo()
    return folders


def test_gated_attention_report_prints_a_row_per_variant_with_seeds(runs, capsys, tmp_path):
    names = ["none", "none_seed1", "headwise", "elementwise", "none_lr_high", "elementwise_lr_high"]
    capsys.readouterr()
    assert seedlm(["report", "gated-attention", *(str(runs[n]) for n in names), "--num-sequences", "4",
                   "--output", str(tmp_path / "rows.json"), "--plot", str(tmp_path / "heldout.png")]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table if line.startswith("| ")}
    assert set(rows) >= {"none", "headwise", "elementwise", "none_lr_high", "elementwise_lr_high"}
    assert rows["none"][1:4] == ["none", "0.003", "0, 1"]
    assert rows["elementwise_lr_high"][1:3] == ["elementwise", "0.03"]
    assert "(" in rows["none"][4] and "(" not in rows["headwise"][4]  # two seeds: mean (min-max)
    assert rows["none"][5] == "0.000 (0.000-0.000)"  # one eval per run: nothing fell
    assert len(rows["headwise"][8].split(" / ")) == 2  # one share per layer
    assert (tmp_path / "heldout.png").stat().st_size > 0
    saved = {r["variant"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert saved["none"]["seeds"] == [0, 1]
    assert all(0 <= s <= 1 for s in saved["none"]["first_token_attention_per_layer"][0])


def test_fall_over_last_quarter_starts_from_the_last_eval_at_three_quarters():
    evals = [(250, 5.0), (500, 4.5), (750, 4.2), (1000, 4.1)]
    assert fall_over_last_quarter(evals) == pytest.approx(0.1)  # from step 750
    assert fall_over_last_quarter([(300, 5.0), (800, 4.4), (1000, 4.0)]) == pytest.approx(1.0)  # from step 300
    assert fall_over_last_quarter([(1000, 4.0)]) == 0.0  # one eval: nothing to compare


def test_gated_attention_report_by_step_reads_every_kept_checkpoint(runs, capsys):
    """--by-step: the sink statistics at each checkpoint (seeds may differ in how often they save)."""
    capsys.readouterr()
    assert seedlm(["report", "gated-attention", str(runs["none"]), str(runs["none_seed1"]), "--num-sequences", "2",
                   "--by-step"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index("| variant | seed | step | first-token share | max activation |")
    steps = [line.split(" | ")[:3] for line in lines[header + 2:] if line.startswith("| none")]
    assert steps == [["| none", "0", "2"], ["| none", "1", "1"], ["| none", "1", "2"]]
    assert (runs["none_seed1"] / "exports" / "step_00000001" / "config.json").is_file()  # exported once, kept


def test_length_extrapolation_report_prints_the_table_and_the_plot(runs, capsys, tmp_path):
    capsys.readouterr()
    names = ["dp_nh1", "dp_nh2", "dp_nh3", "gated_attention"]
    assert seedlm(["report", "length-extrapolation", *(str(runs[n]) for n in names), "--max-length", "128",
                   "--positions", "32,64,128", "--num-sequences", "2", "--plot", str(tmp_path / "len.png"),
                   "--smooth", "8"]) == 0
    out = capsys.readouterr().out
    assert "| variant | params | seeds | sequences | loss @32 | loss @64 | loss @128 |" in out
    for name in names:
        assert f"| {name} |" in out
    assert (tmp_path / "len.png").stat().st_size > 0


def test_report_refuses_what_it_cannot_use(runs, capsys, tmp_path):
    def refused(args, message):
        capsys.readouterr()
        assert seedlm(["report", *args]) == 2
        assert message in capsys.readouterr().err

    refused(["gated-attention", str(tmp_path)], "is not a run folder (no config.yaml)")
    refused(["gated-attention", str(runs["dp_nh2"])], "has no attention layers")
    refused(["length-extrapolation", str(runs["dp_nh1"]), "--max-length", "64"],
            "--positions [256, 1024, 4096] outside 1..--max-length 64")

    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["headwise"], unfinished)
    config = yaml.safe_load((unfinished / "config.yaml").read_text())
    config["train"]["max_steps"] = 5
    (unfinished / "config.yaml").write_text(yaml.safe_dump(config))
    refused(["gated-attention", str(unfinished)], "is not finished: step 2 of max_steps 5")

    no_holdout = tmp_path / "no_holdout"
    shutil.copytree(runs["headwise"], no_holdout)
    config = yaml.safe_load((no_holdout / "config.yaml").read_text())
    config["data"]["sources"][0]["holdout_fraction"] = 0.0
    (no_holdout / "config.yaml").write_text(yaml.safe_dump(config))
    refused(["gated-attention", str(no_holdout)], "has no held-out split")

    twin = tmp_path / "headwise_seed1"
    shutil.copytree(runs["headwise"], twin)
    refused(["gated-attention", str(runs["headwise"]), str(twin)], "share a train.seed")
