"""Our harness and lm-evaluation-harness agree on the same local tasks (skipped without the `eval` extra)."""

import shutil

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

from seedlm.eval.harness import evaluate, load_model_dir  # noqa: E402
from seedlm.eval.lm import CausalLM  # noqa: E402
from seedlm.eval.requests import Loglikelihood  # noqa: E402
from seedlm.eval.synthetic import write_synthetic_task  # noqa: E402
from seedlm.eval.tasks import TASKS_DIR  # noqa: E402
from seedlm.launch.checkpoint import resolve_model_dir, write_manifest  # noqa: E402
from tests.test_eval_utils import quickstart_tokenizer, saved_model_dir  # noqa: E402

TASKS = ["tiny_qa", "tiny_cloze", "tiny_text", "tiny_arith", "parity"]
EXACT = {"acc", "acc_norm", "exact_match"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("lm_eval")
    model_dir = saved_model_dir(tmp)
    # a task written the PLATFORM_NOTES way: dataset_path json with an absolute data_files path
    synthetic_dir = tmp / "synthetic"
    write_synthetic_task("parity", synthetic_dir, num_docs=12)
    manager = TaskManager(include_path=[str(TASKS_DIR), str(synthetic_dir)])
    return model_dir, synthetic_dir, manager


def lm_eval_metric(results: dict, task: str, metric: str) -> float:
    return float(results["results"][task][f"{metric},none"])


def test_same_metrics_as_lm_eval_hf(setup):
    model_dir, synthetic_dir, manager = setup
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},trust_remote_code=True",
        tasks=TASKS,
        task_manager=manager,
        batch_size=4,
        device="cpu",
        log_samples=True,
    )
    model, tok = load_model_dir(model_dir)
    ours = evaluate(model, tok, TASKS[:-1] + [str(synthetic_dir / "parity.yaml")], batch_size=3, show_progress=False)
    for task in TASKS:
        for metric, value in ours[task].items():
            if metric.endswith("_stderr") or metric == "num_docs":
                continue
            expected = lm_eval_metric(theirs, task, metric)
            if metric in EXACT:
                assert value == expected, (task, metric)
            else:
                assert value == pytest.approx(expected, rel=1e-4), (task, metric)
    # and request by request: the log-likelihood of every choice of the multiple-choice task
    lm = CausalLM(model, tok, show_progress=False)
    samples = theirs["samples"]["tiny_qa"]
    requests = [Loglikelihood(*args) for s in samples for args in s["arguments"]]
    expected = [float(resp[0][0]) for s in samples for resp in s["resps"]]
    got = [lp for lp, _ in lm.loglikelihood(requests)]
    assert got == pytest.approx(expected, abs=1e-4)


def test_seedlm_adapter_evaluates_a_run_folders_latest_checkpoint(setup):
    import seedlm.launch.lm_eval_adapter  # noqa: F401 - registers "seedlm"

    model_dir, _, manager = setup
    run = model_dir.parent / "run"
    step = run / "checkpoints" / "step_00000007"
    step.mkdir(parents=True)
    shutil.copytree(model_dir, step / "hf")
    write_manifest(step)
    (run / "checkpoints" / "latest").write_text("step_00000007\n")
    theirs = lm_eval.simple_evaluate(
        model="seedlm", model_args=f"run_dir={run}", tasks=["tiny_qa"], task_manager=manager, batch_size=4, device="cpu"
    )
    model, tok = load_model_dir(resolve_model_dir(run))
    ours = evaluate(model, tok, ["tiny_qa"], show_progress=False)["tiny_qa"]
    assert ours["acc"] == lm_eval_metric(theirs, "tiny_qa", "acc")
    assert ours["acc_norm"] == lm_eval_metric(theirs, "tiny_qa", "acc_norm")


def test_seedlm_adapter_splits_word_spanning_pieces_on_the_quickstart_tokenizer(setup):
    # tiny_cloze has "... alphabet is" + " a", one piece "▁is▁a" in the quickstart tokenizer: lm-eval's
    # split gives the continuation no token (HFLM asserts), the adapter's gives it "▁is▁a"
    import math

    import seedlm.launch.lm_eval_adapter  # noqa: F401 - registers "seedlm"

    _, _, manager = setup
    tmp = setup[0].parent / "quickstart"
    tok = quickstart_tokenizer(str(tmp / "tok"))
    assert "▁is▁a" in tok.get_vocab()
    model_dir = saved_model_dir(tmp, tokenizer=tok)
    theirs = lm_eval.simple_evaluate(model="seedlm", model_args=f"pretrained={model_dir}", tasks=["tiny_cloze"],
                                     task_manager=manager, batch_size=4, device="cpu")
    model, tok = load_model_dir(model_dir)
    ours = evaluate(model, tok, ["tiny_cloze"], show_progress=False)["tiny_cloze"]
    assert ours["num_docs"] == theirs["results"]["tiny_cloze"]["sample_len"] == 12
    assert math.isfinite(ours["perplexity"])
    assert ours["acc"] == lm_eval_metric(theirs, "tiny_cloze", "acc")
    assert ours["perplexity"] == pytest.approx(lm_eval_metric(theirs, "tiny_cloze", "perplexity"), rel=1e-4)
