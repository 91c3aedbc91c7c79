"""Rounds, spreads and goals: what every benchmark uses to say how much its numbers move.

A benchmark measures its baseline and its own path in turn, several rounds (`--rounds`, default 3), so a
noisy neighbour that slows one round down hits both; each ratio is taken within a round (ours / baseline)
and reported as min / median / max over the rounds. A goal is "met" only when the worst round meets it,
"unstable" when some rounds meet it and some do not, "missed" when no round does. Bytes saved for backward
do not depend on load and need no rounds; times do.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

ROUNDS = 3  # the default for a measurement
SMOKE_ROUNDS = 2  # --smoke: the same code, fewer rounds of tiny sizes
MET, UNSTABLE, MISSED = "met", "unstable", "missed"


@dataclass(frozen=True)
class Spread:
    """min / median / max of one measure over rounds."""

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        values = list(values)
        if not values:
            raise ValueError("a spread needs at least one round")
        return cls(min(values), statistics.median(values), max(values))

    def map(self, fn: Callable[[float], float]) -> Spread:
        """The spread of fn(value) for an increasing fn, e.g. a ratio as percent overhead: 100 * (r - 1)."""
        return Spread(fn(self.min), fn(self.median), fn(self.max))

    def format(self, spec: str = "{:.2f}", unit: str = "") -> str:
        """'min / median / max' with each number through `spec`, the unit once at the end: '0.98 / 1.02 / 1.05x'."""
        return " / ".join(spec.format(x) for x in (self.min, self.median, self.max)) + unit


def ratio_spread(numerators: Iterable[float], denominators: Iterable[float]) -> Spread:
    """The spread of the per-round ratios numerator / denominator (the lists are in round order)."""
    numerators, denominators = list(numerators), list(denominators)
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators against {len(denominators)} denominators: one each per round")
    return Spread.of(n / d for n, d in zip(numerators, denominators))


COMPARISONS = {">=": lambda x, limit: x >= limit, "<=": lambda x, limit: x <= limit}


def goal_status(spread: Spread, op: str, limit: float) -> str:
    """MET when the worst round meets `op limit`, UNSTABLE when only some rounds do, MISSED when none does."""
    if op not in COMPARISONS:
        raise ValueError(f"goal comparison {op!r}: use one of {', '.join(COMPARISONS)}")
    meets = COMPARISONS[op]
    worst, best = (spread.min, spread.max) if op == ">=" else (spread.max, spread.min)
    if meets(worst, limit):
        return MET
    return UNSTABLE if meets(best, limit) else MISSED


def goal(what: str, spread: Spread, op: str, limit: float, spec: str = "{:.2f}", unit: str = "") -> str:
    """One goal as text: 'what >= 1.0x: 0.98 / 1.02 / 1.05x, unstable' (min / median / max over the rounds)."""
    return f"{what} {op} {spec.format(limit)}{unit}: {spread.format(spec, unit)}, {goal_status(spread, op, limit)}"


def interleaved_rounds(measures: dict[Hashable, Callable[[], float]], rounds: int) -> dict[Hashable, list[float]]:
    """{name: one value per round}: each round calls every measure once, in turn, so load hits them alike."""
    values: dict[Hashable, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            values[name].append(measure())
    return values


def round_count(text: str) -> int:
    """argparse type of --rounds: an integer >= 2 (one round has no spread)."""
    try:
        rounds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of rounds") from None
    if rounds < 2:
        raise argparse.ArgumentTypeError(f"{rounds}: at least 2 rounds are needed to see a spread "
                                         f"(default {ROUNDS}, {SMOKE_ROUNDS} with --smoke)")
    return rounds


def add_rounds_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=round_count, default=None, metavar="N",
                        help="rounds, baseline and ours in turn in each; ratios are reported as min / median / max "
                             f"over them and a goal is met only when the worst round meets it. None: {ROUNDS}, "
                             f"or {SMOKE_ROUNDS} with --smoke")


def resolve_rounds(args: argparse.Namespace) -> int:
    """args.rounds, or the default for this mode (full or --smoke); stored back into args."""
    if args.rounds is None:
        args.rounds = SMOKE_ROUNDS if args.smoke else ROUNDS
    return args.rounds
