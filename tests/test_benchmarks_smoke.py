"""The benchmarks' smoke modes run and print their tables with the spread over rounds, and `seedlm bench` rewrites
only the README's marked blocks (never a time assertion: speed lives in benchmarks/; the spread and goal helpers
are tested in test_bench_rounds.py)."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.floors import causal_attention_flops, chunk_delta_product_flops
from benchmarks.run_benchmarks import NAMES, BenchError, check_blocks, rewrite_block

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))

# the header of a table each benchmark prints
TABLES = {
    "gated_moe": "| seedlm gate=elementwise |",
    "delta_product": "| n_h | T | chunk (ms) |",
    "data_pipeline": "| pipeline (tokenise + pack) | tokens/s |",
    "trainer": "| ZeRO stage | parameters |",
    "scaling": "| run | tokens/s | tokens/s per rank |",
    "loss_memory": "| vocab | saved B/token plain | saved B/token fused |",
    "delta_product_memory": "| T | kernel, recompute | kernel, old |",
    "activation_checkpointing": "| family | activation_checkpointing | saved KiB / token |",
    "startup_memory": "| construction | build | start-up | first step |",
    "checkpoint_save": "| ranks, ZeRO | mode | state per save |",
    "host_allocator": "| allocator | peak RSS, worst rank, per round | tokens/s, per round |",
}


def seedlm_bench(*argv, timeout=600):
    return subprocess.run([sys.executable, "-m", "seedlm.launch.cli", "bench", *argv], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def block_body(text: str, name: str) -> str:
    """What lies between <!-- bench:NAME --> and <!-- /bench:NAME -->."""
    return text.split(f"<!-- bench:{name} -->", 1)[1].split(f"<!-- /bench:{name} -->", 1)[0]


def outside_blocks(text: str) -> str:
    """The text with each block's body removed (markers kept): what `seedlm bench` must leave byte for byte."""
    for name in NAMES:
        head, rest = text.split(f"<!-- bench:{name} -->", 1)
        _, tail = rest.split(f"<!-- /bench:{name} -->", 1)
        text = f"{head}<!-- bench:{name} --><!-- /bench:{name} -->{tail}"
    return text


def test_floor_flop_counts():
    # T=2, one chunk of 2 tokens, H=K=V=1: A 8 + Aq 8 + inverse 8 + U, W 16 + Vn 4 + S1 4 + o 8 + 4 = 60, x3
    assert chunk_delta_product_flops(2, 1, 1, 1, 1, chunk_size=2) == 3 * 60
    # linear in T over whole chunks (the last chunk is padded), quadratic for attention
    assert chunk_delta_product_flops(8192, 2, 4, 64, 64, 64) == 2 * chunk_delta_product_flops(4096, 2, 4, 64, 64, 64)
    assert chunk_delta_product_flops(33, 1, 1, 8, 8, 32) == chunk_delta_product_flops(64, 1, 1, 8, 8, 32)
    assert causal_attention_flops(2048, 4, 64) == 4 * causal_attention_flops(1024, 4, 64)
    assert causal_attention_flops(10, 2, 8) == 3 * 2 * 2 * 10 * 10 * 8


def test_rewrite_block_replaces_only_the_body():
    text = "intro\n<!-- bench:a -->\nold\ntable\n<!-- /bench:a -->\nkept  \n<!-- bench:b -->\nB\n<!-- /bench:b -->"
    new = rewrite_block(text, "a", "\n| new |\n")
    assert new == "intro\n<!-- bench:a -->\n| new |\n<!-- /bench:a -->\nkept  \n<!-- bench:b -->\nB\n<!-- /bench:b -->"
    assert rewrite_block(new, "a", "| new |") == new  # idempotent


@pytest.mark.parametrize(
    "text, message",
    [
        ("no markers", "no block for 'a': add the lines <!-- bench:a --> and <!-- /bench:a -->"),
        ("<!-- bench:a -->\nx", "exactly one <!-- bench:a --> and one <!-- /bench:a --> (found 1 and 0)"),
        ("<!-- bench:a -->x<!-- /bench:a --><!-- bench:a -->", "(found 2 and 1)"),
        ("<!-- /bench:a -->x<!-- bench:a -->", "<!-- /bench:a --> comes before <!-- bench:a -->"),
    ],
)
def test_malformed_blocks_are_refused_with_a_message(text, message):
    with pytest.raises(BenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_blocks(text, ["a"], "README.md")


def test_the_readme_has_every_block():
    check_blocks((REPO / "README.md").read_text(), NAMES, "README.md")


def test_every_benchmark_has_a_table_to_look_for():
    assert set(TABLES) == set(NAMES)


def test_seedlm_bench_help_lists_every_option_and_benchmark():
    result = seedlm_bench("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--only", "--smoke", "--rounds", "--readme"):
        assert option in result.stdout
    assert "min / median / max" in " ".join(result.stdout.split())
    for name in NAMES:
        assert f"\n  {name} " in result.stdout, name


def bench_in_process(capsys, *argv) -> tuple[int, str]:
    """`seedlm bench ARGV` in this process (a fresh interpreter costs ~10 s of imports): (exit code, stderr)."""
    from seedlm.launch.cli import main as seedlm

    try:
        code = seedlm(["bench", *argv])
    except SystemExit as exit:  # argparse's refusals
        code = exit.code
    return code, capsys.readouterr().err


def test_user_mistakes_stop_before_anything_is_measured(tmp_path, capsys):
    code, err = bench_in_process(capsys, "--only", "gated_moee")
    assert code == 2
    assert "argument --only: no benchmark 'gated_moee' (did you mean 'gated_moe'?); the benchmarks: " in err
    code, err = bench_in_process(capsys, "--rounds", "1")
    assert code == 2 and "argument --rounds: 1: at least 2 rounds are needed" in err
    code, err = bench_in_process(capsys, "--readme", str(tmp_path / "missing.md"))
    assert code == 2 and "missing.md: no such file" in err
    readme = tmp_path / "README.md"
    readme.write_text("# notes\n<!-- bench:gated_moe -->\n<!-- /bench:gated_moe -->\n")
    code, err = bench_in_process(capsys, "--only", "gated_moe", "delta_product", "--readme", str(readme))
    assert code == 2
    assert "no block for 'delta_product': add the lines <!-- bench:delta_product -->" in err
    assert "measuring" not in err
    assert readme.read_text() == "# notes\n<!-- bench:gated_moe -->\n<!-- /bench:gated_moe -->\n"


def test_seedlm_bench_outside_a_checkout_says_it_needs_one(tmp_path, monkeypatch, capsys):
    from seedlm.launch.commands import bench

    monkeypatch.setattr(bench, "RUNNER", tmp_path / "benchmarks" / "run_benchmarks.py")  # as from a wheel
    code, err = bench_in_process(capsys, "--smoke")
    assert code == 2
    assert err.count("\n") == 1 and "scripts of a source checkout" in err and "Clone the repository" in err


def imported_top_names(folder: Path) -> dict[str, set[str]]:
    """{file: top-level names of the modules it imports} for every .py under folder."""
    found = {}
    for path in folder.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


def test_the_package_never_imports_benchmarks_and_benchmarks_never_import_tests():
    # benchmarks/ is not in the wheel, and tests/ is in neither
    for folder in ("seedlm", "model", "data_pipeline", "launch", "eval"):
        for path, names in imported_top_names(REPO / folder).items():
            assert not names & {"benchmarks", "tests"}, path
    for path, names in imported_top_names(REPO / "benchmarks").items():
        assert "tests" not in names, path


def test_seedlm_bench_smoke_prints_tables_and_writes_nothing():
    before = (REPO / "README.md").read_bytes()
    result = seedlm_bench("--smoke", "--only", "gated_moe")
    assert result.returncode == 0, result.stderr[-3000:]
    assert TABLES["gated_moe"] in result.stdout and "| floor (ms) |" in result.stdout
    assert "2 rounds of 2 steps per model" in result.stdout  # smoke: the same code, 2 rounds
    goals = next(line for line in result.stdout.splitlines() if line.startswith("Goals"))
    assert re.search(r"ours vs transformers >= 1\.00x: [\d.]+ / [\d.]+ / [\d.]+x, (met|unstable|missed);", goals)
    assert "[1/1] gated_moe: done" in result.stderr  # the progress display
    assert (REPO / "README.md").read_bytes() == before


def test_seedlm_bench_runs_a_memory_benchmark_with_its_rounds():
    result = seedlm_bench("--smoke", "--only", "delta_product_memory", "--rounds", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert TABLES["delta_product_memory"] in result.stdout
    assert "Measured by `seedlm bench --only delta_product_memory --smoke --rounds 3`" in result.stdout
    assert "min / median / max of 3 rounds" in result.stdout
    times = [line for line in result.stdout.splitlines() if re.match(r"\| \d+ \| [\d.]+ / [\d.]+ / [\d.]+ \|", line)]
    assert len(times) == 2  # one row per T of the smoke sizes, each with its spread


# The smoke run of every benchmark in two halves of about the same time (~4 minutes each on the AMD EPYC VM), each
# well inside its timeout; together they are a whole `seedlm bench --smoke`.
SMOKE_HALVES = [
    ["gated_moe", "delta_product", "data_pipeline", "trainer", "loss_memory", "delta_product_memory",
     "activation_checkpointing", "checkpoint_save"],
    ["scaling", "startup_memory", "host_allocator"],
]


def test_the_smoke_halves_are_every_benchmark_once():
    assert sorted(sum(SMOKE_HALVES, [])) == sorted(NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("half", SMOKE_HALVES, ids=["first-half", "second-half"])
def test_seedlm_bench_smoke_rewrites_only_the_marked_blocks_of_a_readme_copy(tmp_path, half):
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    with readme.open("ab") as f:  # someone's own subsection, Windows line endings and trailing spaces included
        f.write(b"\n### Someone's own subsection\r\n\r\ntrailing text  \r\n")
    before = readme.read_bytes().decode()
    # each benchmark starts its own process (measure_in_child)
    result = seedlm_bench("--smoke", "--only", *half, "--readme", str(readme), timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    after = readme.read_bytes().decode()
    assert outside_blocks(after) == outside_blocks(before)
    for name in NAMES:
        body = block_body(after, name)
        if name not in half:  # a block of a benchmark that did not run is left as it was
            assert body == block_body(before, name)
            continue
        assert TABLES[name] in result.stdout
        assert TABLES[name] in body
        assert f"`seedlm bench --only {' '.join(half)} --smoke` (this block alone: `seedlm bench --only {name}`)" \
            in body, body[:300]
    if "scaling" in half:
        assert (tmp_path / "benchmarks" / "results" / "scaling_seq_len.png").stat().st_size > 0
        assert "![kernel time against sequence length, log-log](benchmarks/results/scaling_seq_len.png)" in after


@pytest.mark.parametrize("script", ["bench_gated_moe.py", "bench_delta_product.py", "bench_loss_memory.py"])
def test_a_benchmark_script_runs_alone(script):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke"], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert TABLES[script.removeprefix("bench_").removesuffix(".py")] in result.stdout
    assert "2 rounds" in result.stdout


def test_a_benchmark_script_refuses_one_round():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_delta_product.py"), "--rounds", "1"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "argument --rounds: 1: at least 2 rounds are needed" in result.stderr


def test_cuda_check_says_it_needs_a_gpu_here():
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/check_cuda_paths.py itself")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "check_cuda_paths.py")], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 1 and "no CUDA device" in result.stdout
