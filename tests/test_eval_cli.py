"""`seedlm eval` through launch.cli.main: a failing task is reported and does not discard the others; --help."""

import json
import shutil

import pytest

from seedlm.eval.tasks import TASKS_DIR
from seedlm.launch.checkpoint import write_manifest
from seedlm.launch.cli import build_parser, main
from tests.test_eval_utils import saved_model_dir

# three tasks of a user's include path, each broken in its own way; the first two fail to load, the third
# while it runs (its continuation is longer than the model's 256 positions)
MISSING_DATA = """\
task: missing_data
custom_dataset: !function local_data.load
dataset_kwargs:
  data_files:
    test: data/nowhere.jsonl
test_split: test
output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{' ' + target}}"
"""
UNKNOWN_METRIC = MISSING_DATA.replace("missing_data", "unknown_metric").replace("nowhere", "tiny_cloze") + (
    "metric_list:\n  - metric: bleu\n"
)
TOO_LONG = MISSING_DATA.replace("missing_data", "too_long").replace("nowhere", "tiny_cloze").replace(
    "{{' ' + target}}", "{{(' ' + target) * 1000}}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_model_dir(tmp_path_factory.mktemp("model"))


def user_tasks(tmp_path):
    folder = tmp_path / "my_tasks"
    (folder / "data").mkdir(parents=True)
    shutil.copy(TASKS_DIR / "local_data.py", folder)
    shutil.copy(TASKS_DIR / "data" / "tiny_cloze.jsonl", folder / "data")
    for name, text in [("missing_data", MISSING_DATA), ("unknown_metric", UNKNOWN_METRIC), ("too_long", TOO_LONG)]:
        (folder / f"{name}.yaml").write_text(text)
    return folder


def test_a_failing_task_is_reported_and_the_others_are_written(tmp_path, model_dir, capsys):
    folder = user_tasks(tmp_path)
    common = [str(model_dir), "--include-path", str(folder), "--limit", "3", "--batch-size", "4"]
    good_only = tmp_path / "good.json"
    assert main(["eval", *common, "--tasks", "tiny_qa,parity", "--output", str(good_only)]) == 0
    capsys.readouterr()

    out = tmp_path / "all.json"
    names = "tiny_qa,missing_data,unknown_metric,too_long,parity"
    assert main(["eval", *common, "--tasks", names, "--output", str(out)]) == 1
    captured = capsys.readouterr()
    payload = json.loads(out.read_text())
    # the good tasks' results are written, the same as in a run without the broken ones
    assert payload["results"] == json.loads(good_only.read_text())["results"]
    failed = payload["failed"]
    assert list(failed) == ["missing_data", "unknown_metric", "too_long"]
    assert "nowhere.jsonl" in failed["missing_data"] and "FileNotFoundError" in failed["missing_data"]
    assert "unknown metric 'bleu'" in failed["unknown_metric"]
    assert "does not fit the model's max length 256" in failed["too_long"]
    # each reason once on stderr (among progress bars), then one summary line; the table on stdout
    err = [line for line in captured.err.splitlines() if line.startswith("seedlm eval: ")]
    assert len(err) == 4
    assert "task too_long failed: ValueError: a continuation of" in captured.err
    assert err[-1].startswith("seedlm eval: 3 of 5 tasks failed (missing_data, unknown_metric, too_long)")
    assert "| tiny_qa | acc |" in captured.out and "| parity | acc |" in captured.out
    markdown = out.with_suffix(".md").read_text()
    assert "| tiny_qa | acc |" in markdown and "- too_long: ValueError: a continuation of" in markdown


def test_no_task_loads_exits_before_the_model_loads(tmp_path, capsys):
    folder = user_tasks(tmp_path)
    # no model folder at all: the task errors are reported before the model would load
    rc = main(["eval", str(tmp_path / "no_model"), "--include-path", str(folder),
               "--tasks", "missing_data,unknown_metric,nope"])
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("seedlm eval: ")]
    assert len(err) == 3 and "nowhere.jsonl" in err[0] and "bleu" in err[1] and "unknown task 'nope'" in err[2]
    assert not (tmp_path / "no_model").exists()


def test_evaluate_without_failures_raises_on_the_first_failing_task(tmp_path, model_dir):
    # what the trainer calls: a broken task stops the evaluation (on every rank alike)
    from seedlm.eval.harness import evaluate, load_model_dir

    model, tok = load_model_dir(model_dir)
    with pytest.raises(ValueError, match="does not fit the model's max length"):
        evaluate(model, tok, ["tiny_qa", str(user_tasks(tmp_path) / "too_long.yaml")], limit=2, show_progress=False)


def test_evaluate_with_failures_records_them_and_runs_the_rest(tmp_path, model_dir):
    # names, paths and Task objects mixed: a name that does not load and a task that raises are recorded
    from seedlm.eval.harness import evaluate, load_model_dir
    from seedlm.eval.synthetic import synthetic_task

    model, tok = load_model_dir(model_dir)
    folder = user_tasks(tmp_path)
    failures = {}
    tasks = ["nope", "tiny_qa", str(folder / "too_long.yaml"), synthetic_task("parity", num_docs=2)]
    results = evaluate(model, tok, tasks, limit=2, failures=failures, show_progress=False)
    assert list(results) == ["tiny_qa", "parity"] and results["tiny_qa"]["num_docs"] == 2
    assert list(failures) == ["nope", "too_long"] and "unknown task 'nope'" in failures["nope"]


def test_eval_of_a_run_folder_falls_back_from_a_truncated_checkpoint(tmp_path, model_dir, capsys, caplog):
    # two checkpoints as the trainer writes them; the newest one's weights were cut short after its manifest
    run = tmp_path / "run"
    for step in ("step_00000002", "step_00000004"):
        shutil.copytree(model_dir, run / "checkpoints" / step / "hf")
        write_manifest(run / "checkpoints" / step)
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    weights = run / "checkpoints" / "step_00000004" / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    out = tmp_path / "results.json"
    assert main(["eval", str(run), "--tasks", "tiny_qa", "--limit", "3", "--output", str(out)]) == 0
    capsys.readouterr()
    payload = json.loads(out.read_text())
    assert payload["info"]["checkpoint"] == str(run / "checkpoints" / "step_00000002" / "hf")  # as resume picks
    warnings = [r.getMessage() for r in caplog.records if "step_00000004 is not usable" in r.getMessage()]
    assert len(warnings) == 1 and "truncated" in warnings[0]  # said once
    assert payload["results"]["tiny_qa"]["num_docs"] == 3
    assert weights.stat().st_size == 100  # the broken checkpoint is left as it was, for the user to look at

    # with no complete checkpoint left: one message, exit 2, nothing written
    (run / "checkpoints" / "step_00000002" / "manifest.json").unlink()
    out.unlink()
    assert main(["eval", str(run), "--tasks", "tiny_qa", "--output", str(out)]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err and not out.exists()


def test_every_eval_option_has_help(capsys):
    eval_parser = build_parser()._subparsers._group_actions[0].choices["eval"]
    options = [a for a in eval_parser._actions if a.dest != "help"]
    assert len(options) >= 13
    assert [a.dest for a in options if not (a.help and a.help.strip())] == []
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert all(a.option_strings[0] in shown for a in options if a.option_strings)
