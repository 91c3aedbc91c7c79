"""benchmarks/rounds.py: spreads over rounds and goal status (pure functions, no timing), and the runner's options."""

import argparse

import pytest

from benchmarks.rounds import (
    MET,
    MISSED,
    UNSTABLE,
    Spread,
    add_rounds_argument,
    goal,
    goal_status,
    interleaved_rounds,
    ratio_spread,
    resolve_rounds,
    round_count,
)
from benchmarks.run_benchmarks import NAMES, benchmark_name, command_line, parse_args


def test_spread_is_min_median_max_whatever_the_order():
    spread = Spread.of([1.3, 0.9, 1.1])
    assert (spread.min, spread.median, spread.max) == (0.9, 1.1, 1.3)
    assert spread.format() == "0.90 / 1.10 / 1.30"
    assert spread.format("{:.0f}", "%") == "1 / 1 / 1%"
    assert Spread.of([2.0, 1.0]).median == 1.5  # an even count takes the middle two's mean
    assert spread.map(lambda r: 100 * (r - 1)).format("{:+.0f}", "%") == "-10 / +10 / +30%"
    with pytest.raises(ValueError, match="at least one round"):
        Spread.of([])


def test_ratio_spread_takes_each_ratio_within_its_round():
    # round 0: ours 2 vs baseline 1 (a slow round for both would cancel); round 1: 3 vs 3; round 2: 4 vs 2
    assert ratio_spread([2.0, 3.0, 4.0], [1.0, 3.0, 2.0]) == Spread(1.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="3 numerators against 2 denominators: one each per round"):
        ratio_spread([1.0, 2.0, 3.0], [1.0, 2.0])


@pytest.mark.parametrize(
    "rounds, op, limit, status",
    [
        ([1.1, 1.2, 1.3], ">=", 1.0, MET),  # the worst round (1.1) meets it
        ([1.0, 1.2, 1.3], ">=", 1.0, MET),  # the limit itself meets it
        ([0.9, 1.05, 1.2], ">=", 1.0, UNSTABLE),  # straddles: some rounds meet it, the worst does not
        ([0.7, 0.8, 0.99], ">=", 1.0, MISSED),  # no round meets it
        ([3.9, 4.0, 4.4], "<=", 4.5, MET),  # lower is better: the worst round is the largest
        ([3.9, 4.4, 6.8], "<=", 4.5, UNSTABLE),  # the Intel rerun beside the README's one run
        ([4.6, 5.0, 6.8], "<=", 4.5, MISSED),
    ],
)
def test_goal_is_met_only_when_the_worst_round_meets_it(rounds, op, limit, status):
    assert goal_status(Spread.of(rounds), op, limit) == status


def test_one_round_that_looks_fine_is_not_enough_when_the_median_hides_the_worst():
    # the median meets the goal; the worst round does not: not "met"
    spread = Spread.of([0.95, 1.05, 1.10])
    assert spread.median >= 1.0 and goal_status(spread, ">=", 1.0) == UNSTABLE


def test_goal_text_names_the_limit_the_spread_and_the_status():
    text = goal("overhead", Spread.of([2.0, 5.0, 12.0]), "<=", 10, "{:.1f}", "%")
    assert text == "overhead <= 10.0%: 2.0 / 5.0 / 12.0%, unstable"
    with pytest.raises(ValueError, match="goal comparison '<': use one of >=, <="):
        goal_status(Spread.of([1.0]), "<", 1.0)


def test_interleaved_rounds_call_each_measure_once_per_round_in_turn():
    calls = []

    def measure(name):
        calls.append(name)
        return float(len(calls))

    values = interleaved_rounds({"baseline": lambda: measure("baseline"), "ours": lambda: measure("ours")}, 3)
    assert calls == ["baseline", "ours"] * 3  # never all baseline rounds, then all of ours
    assert values == {"baseline": [1.0, 3.0, 5.0], "ours": [2.0, 4.0, 6.0]}


@pytest.mark.parametrize("text, message", [
    ("1", "1: at least 2 rounds are needed to see a spread (default 3, 2 with --smoke)"),
    ("0", "0: at least 2 rounds"),
    ("three", "'three' is not a whole number of rounds"),
])
def test_rounds_option_refuses_what_gives_no_spread(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        round_count(text)


def test_rounds_default_to_three_and_two_with_smoke_unless_given():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    add_rounds_argument(parser)
    assert resolve_rounds(parser.parse_args([])) == 3
    assert resolve_rounds(parser.parse_args(["--smoke"])) == 2
    assert resolve_rounds(parser.parse_args(["--smoke", "--rounds", "4"])) == 4


def test_runner_names_the_rounds_it_ran_only_when_they_differ_from_the_default():
    assert command_line(parse_args(["--rounds", "3"])) == "seedlm bench"
    args = parse_args(["--only", "trainer", "--smoke", "--rounds", "3"])
    resolve_rounds(args)
    assert command_line(args) == "seedlm bench --only trainer --smoke --rounds 3"


def test_a_misspelt_benchmark_name_gets_the_closest_and_the_list():
    assert benchmark_name("loss_memory") == "loss_memory"
    with pytest.raises(argparse.ArgumentTypeError) as err:
        benchmark_name("delta_prodcut_memory")
    assert str(err.value) == ("no benchmark 'delta_prodcut_memory' (did you mean 'delta_product_memory'?); "
                              "the benchmarks: " + ", ".join(NAMES))
    with pytest.raises(argparse.ArgumentTypeError, match=r"^no benchmark 'zzz'; the benchmarks: gated_moe, "):
        benchmark_name("zzz")
