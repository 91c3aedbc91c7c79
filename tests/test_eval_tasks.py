"""YAML tasks: clear errors for malformed files, metrics against hand computation, reports, the CLI."""

import argparse
import json
import math
import re
import textwrap

import pytest

from seedlm.eval.harness import evaluate, flat_metrics, load_model_dir, markdown_table, save_results
from seedlm.eval.lm import CausalLM
from seedlm.eval.requests import Loglikelihood, LoglikelihoodRolling
from seedlm.eval.tasks import TaskError, load_task_file, resolve_tasks
from seedlm.launch.checkpoint import CheckpointError, resolve_model_dir, write_manifest
from tests.test_eval_utils import saved_model_dir, tiny_model, tiny_tokenizer

GOOD = """\
task: my_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: data.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{q}}\\nA:"
doc_to_target: gold
doc_to_choice: "{{options}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def net(tok):
    return tiny_model("gated_moe", len(tok))


def write_task(tmp_path, text: str, data=True):
    if data:
        rows = [
            {"q": "2+2", "options": ["4", "5", "22"], "gold": 0},
            {"q": "red?", "options": ["yes", "no"], "gold": 1},
        ]
        (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "task.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda t: t.replace('doc_to_choice: "{{options}}"\n', ""), "missing field 'doc_to_choice'"),
        (lambda t: t.replace("task: my_mc\n", ""), "missing field 'task'"),
        (
            lambda t: t.replace("metric: acc_norm", "metric: accuracy"),
            "metric_list[1].metric: unknown metric 'accuracy'",
        ),
        (lambda t: t.replace("data.jsonl", "nowhere.jsonl"), "nowhere.jsonl does not exist"),
        (lambda t: t.replace("test_split: test", "test_splt: test"), "unknown field 'test_splt'"),
        (lambda t: t.replace("multiple_choice", "multi_choice"), "output_type: unknown 'multi_choice'"),
        (lambda t: t + "filter_list: []\n", "field 'filter_list' is not supported"),
        (lambda t: t.replace("test_split: test", "test_split: dev"), "test_split 'dev' is not among"),
        (lambda t: t.replace("doc_to_target: gold", "doc_to_target: '{{answer}}'"), "doc_to_target"),
        (lambda t: t + "  - [unclosed\n", "not valid YAML"),
    ],
)
def test_malformed_task_gets_a_message_naming_file_and_field(tmp_path, edit, expected):
    path = write_task(tmp_path, edit(GOOD))
    with pytest.raises(TaskError) as err:
        load_task_file(path)
    message = str(err.value)
    assert str(path) in message and expected in message
    assert "\n" not in message.split(": not valid YAML")[0]  # one line up to any YAML parser detail


def test_unknown_task_name_lists_known_ones():
    with pytest.raises(TaskError, match="unknown task 'nope'.*tiny_qa"):
        resolve_tasks(["nope"])


def test_multiple_choice_metrics_match_hand_computation(tmp_path, net, tok):
    task = load_task_file(write_task(tmp_path, GOOD))
    results = evaluate(net, tok, [task], batch_size=3, show_progress=False)["my_mc"]
    lm = CausalLM(net, tok, show_progress=False)
    acc, acc_norm = [], []
    for doc in task.docs:
        lps = [lp for lp, _ in lm.loglikelihood([Loglikelihood(f"Q: {doc['q']}\nA:", " " + c) for c in doc["options"]])]
        acc.append(max(range(len(lps)), key=lps.__getitem__) == doc["gold"])
        normed = [lp / len(c) for lp, c in zip(lps, doc["options"])]
        acc_norm.append(max(range(len(lps)), key=normed.__getitem__) == doc["gold"])
    assert results["acc"] == sum(acc) / 2 and results["acc_norm"] == sum(acc_norm) / 2
    assert results["num_docs"] == 2


def test_shipped_tasks_run_and_rolling_metrics_match_hand_computation(net, tok):
    results = evaluate(net, tok, ["tiny_qa", "tiny_cloze", "tiny_text", "tiny_arith"], limit=4, show_progress=False)
    assert set(results) == {"tiny_qa", "tiny_cloze", "tiny_text", "tiny_arith"}
    assert all(r["num_docs"] == 4 for r in results.values())
    docs = load_task_file(resolve_tasks(["tiny_text"])[0].source).docs[:4]
    rolled = CausalLM(net, tok, show_progress=False).loglikelihood_rolling(
        [LoglikelihoodRolling(d["text"]) for d in docs]
    )
    total = sum(r.logprob for r in rolled)
    n_bytes = sum(len(d["text"].encode()) for d in docs)
    n_words = sum(len(re.split(r"\s+", d["text"])) for d in docs)  # lm-eval's count (a trailing "" included)
    text = results["tiny_text"]
    assert text["bits_per_byte"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-9)
    assert text["byte_perplexity"] == pytest.approx(math.exp(-total / n_bytes), rel=1e-9)
    assert text["word_perplexity"] == pytest.approx(math.exp(-total / n_words), rel=1e-9)
    assert 0.0 <= results["tiny_arith"]["exact_match"] <= 1.0


def test_fewshot_context_format(tmp_path):
    text = GOOD + 'training_split: test\nnum_fewshot: 1\ndescription: "Quiz.\\n\\n"\n'
    task = load_task_file(write_task(tmp_path, text))
    context = task.context(task.docs[0], 0)
    # the only other document is the shot: text, delimiter, gold choice, fewshot delimiter, then the doc
    assert context == "Quiz.\n\nQ: red?\nA: no\n\nQ: 2+2\nA:"


def test_results_json_markdown_and_flat_metrics(tmp_path):
    results = {"t": {"acc": 0.5, "acc_stderr": 0.1, "num_docs": 4}, "u": {"bits_per_byte": 1.25, "num_docs": 2}}
    json_path, md_path = save_results(results, tmp_path / "out" / "r.json", {"model_dir": "m"})
    assert json.loads(json_path.read_text())["results"] == results
    assert md_path.read_text() == markdown_table(results)
    assert "| t | acc | 0.5000 | 0.1000 | 4 |" in md_path.read_text()
    assert flat_metrics(results) == {"eval/t/acc": 0.5, "eval/u/bits_per_byte": 1.25}


def test_run_folder_resolves_to_latest_checkpoint(tmp_path):
    model_dir = saved_model_dir(tmp_path)
    assert resolve_model_dir(model_dir) == model_dir
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000020").mkdir(parents=True)
    model_dir.rename(run / "checkpoints" / "step_00000020" / "hf")
    write_manifest(run / "checkpoints" / "step_00000020")
    (run / "checkpoints" / "latest").write_text("step_00000020\n")
    assert resolve_model_dir(run) == run / "checkpoints" / "step_00000020" / "hf"
    with pytest.raises(CheckpointError, match="neither a model folder"):
        resolve_model_dir(tmp_path / "nothing")
    # eval knows model folders only, and says where a run folder is resolved
    with pytest.raises(FileNotFoundError, match=r"no config.json.*seedlm eval RUN_DIR"):
        load_model_dir(run)


def run_cli(argv):
    from seedlm.launch.commands import eval as eval_command

    parser = argparse.ArgumentParser()
    eval_command.add_arguments(parser)
    return eval_command.run(parser.parse_args(argv))


def test_cli_writes_results(tmp_path, capsys):
    model_dir = saved_model_dir(tmp_path)
    out = tmp_path / "res.json"
    rc = run_cli(
        [str(model_dir), "--tasks", "tiny_qa,parity", "--limit", "3", "--output", str(out), "--batch-size", "4"]
    )
    assert rc == 0
    payload = json.loads(out.read_text())
    assert set(payload["results"]) == {"tiny_qa", "parity"} and payload["results"]["parity"]["num_docs"] == 3
    assert out.with_suffix(".md").is_file() and "| tiny_qa | acc |" in capsys.readouterr().out


def test_cli_reports_a_bad_task_in_one_line(tmp_path, capsys):
    bad = write_task(tmp_path, GOOD.replace("metric: acc_norm", "metric: bleu"))
    assert run_cli([str(tmp_path), "--tasks", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("seedlm eval: ") and "bleu" in err and len(err.splitlines()) == 1


def test_yaml_task_text(tmp_path):
    # a YAML written the lm-eval way (absolute data path, jinja templates) loads as is
    data = tmp_path / "d.jsonl"
    data.write_text('{"a": "x", "b": "y"}\n')
    path = tmp_path / "t.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        task: t
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: "{data}"}}}}
        test_split: test
        output_type: loglikelihood
        doc_to_text: "{{{{a}}}} ->"
        doc_to_target: "{{{{' ' + b}}}}"
        """)
    )
    task = load_task_file(path)
    assert task.context(task.docs[0], 0) == "x ->" and task.target(task.docs[0]) == " y"
    assert [m["metric"] for m in task.metrics] == ["acc", "perplexity"]


def test_heldout_loss_is_the_token_weighted_next_token_loss():
    import torch

    from seedlm.eval.harness import heldout_loss

    net = tiny_model("deltaproduct", 64)  # dense FFN: the model's loss has no router terms
    torch.manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 12))
        labels = ids.clone()
        labels[:, :3] = -100  # masked positions are left out of the mean
        batches.append({"input_ids": ids, "labels": labels})
    result = heldout_loss(net, batches + batches, max_batches=3)
    with torch.no_grad():
        per_batch = [float(net(input_ids=b["input_ids"], labels=b["labels"]).loss) for b in batches]
    assert result["tokens"] == 3 * 2 * 9  # 11 predicted positions a row, 2 of them masked
    assert result["loss"] == pytest.approx(sum(per_batch) / 3, rel=1e-5)  # equal token counts per batch
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_cli_device_map_offload_gives_the_same_results(tmp_path, capsys):
    # accelerate's big-model dispatch: with 300 KB of CPU memory allowed, most layers are offloaded to disk
    # and loaded as they run; the numbers must not change
    model_dir = saved_model_dir(tmp_path)
    args = [str(model_dir), "--tasks", "tiny_qa,tiny_text", "--limit", "4", "--batch-size", "4"]
    assert run_cli([*args, "--output", str(tmp_path / "plain.json")]) == 0
    assert run_cli([*args, "--output", str(tmp_path / "offload.json"), "--device-map", "auto",
                    "--max-memory", "cpu=300KB"]) == 0
    import gc
    import tempfile
    from pathlib import Path

    gc.collect()  # the offloaded weights are deleted with the model, not left in the temp folder
    assert not list(Path(tempfile.gettempdir()).glob("seedlm-offload-*"))
    plain, offload = (json.loads((tmp_path / f"{name}.json").read_text())["results"] for name in ("plain", "offload"))
    assert offload.keys() == plain.keys()
    for task in plain:
        assert offload[task] == pytest.approx(plain[task], rel=1e-6), task
    capsys.readouterr()
    assert run_cli([*args, "--max-memory", "cpu=1GB"]) == 2
    assert "--max-memory needs --device-map" in capsys.readouterr().err
    assert run_cli([*args, "--device-map", "auto", "--max-memory", "cpu:1GB"]) == 2
    assert "'cpu:1GB' is not DEVICE=SIZE" in capsys.readouterr().err
