"""`kiln tune`'s search spaces and its plan of trials. Pure Python, no Ray.

An option's value is a space when it is
- a list `64,128,256` (or `lstm,gru`): these values, tried in full as a grid when the search
  has no range, drawn evenly otherwise;
- a range `LOW:HIGH`, or `LOW:HIGH:log` for a log scale (learning rates, widths).

The plan is the list of trials, fixed before the search starts and kept in the search folder,
so that a resumed search runs the same trials. Ranges are drawn by Latin hypercube sampling:
with N trials each range is cut into N equal strata (equal in log space for `:log`) and every
stratum gets one trial, so that even 4 trials cover a learning-rate range from end to end, as
plain random sampling often does not."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from kiln.train.families import family

DEFAULT_TRIALS = 8



@dataclass(frozen=True)
class Choice:
    values: tuple


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def at(self, u: float):
        """The value a share u in [0, 1) of the way along the range (in log space for log).
        An integer range is [low, high + 1) floored, so that each integer, the ends too,
        takes its full share."""
        high = self.high + 1 if self.integer else self.high
        if self.log:
            x = math.exp(math.log(self.low) + u * (math.log(high) - math.log(self.low)))
        else:
            x = self.low + u * (high - self.low)
        return min(int(self.high), max(int(self.low), math.floor(x))) if self.integer else x


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_value(name: str, text: str, kind: type):
    try:
        return kind(text.strip())
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{flag(name)}: {text.strip()!r} is not {what}") from None


def parse_space(name: str, text, kind: type):
    """An option's text as a fixed value, a Choice or a Range (ValueError naming the option
    when it is neither)."""
    if text is None or not isinstance(text, str):
        return text
    if "," in text:
        values = tuple(dict.fromkeys(parse_value(name, v, kind) for v in text.split(",")
                                     if v.strip()))
        if not values:
            raise ValueError(f"{flag(name)}: {text!r} lists no values")
        return Choice(values) if len(values) > 1 else values[0]
    if ":" not in text:
        return parse_value(name, text, kind)
    if kind is str:
        raise ValueError(f"{flag(name)} takes a value or a list of them ({flag(name)} a,b), "
                         f"not a range: {text!r}")
    parts = text.split(":")
    log = len(parts) == 3 and parts[2].strip().lower() == "log"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
        raise ValueError(f"{flag(name)}: a range is LOW:HIGH or LOW:HIGH:log, got {text!r}")
    low, high = (parse_value(name, p, kind) for p in parts[:2])
    if not low < high:
        raise ValueError(f"{flag(name)}: a range's low end must be below its high end, got "
                         f"{text!r}")
    if log and low <= 0:
        raise ValueError(f"{flag(name)}: a log range must be positive, got {text!r}")
    return Range(float(low), float(high), log, kind is int)


def parse_spaces(kind: str, given: dict[str, str | None]) -> tuple[dict, dict]:
    """The options as typed -> (fixed values, spaces). A space on an option the search cannot
    vary is refused by the command line already (its type is not str there)."""
    fixed, spaces = {}, {}
    for name, text in given.items():
        value = parse_space(name, text, family(kind).tunable[name])
        (spaces if isinstance(value, Choice | Range) else fixed)[name] = value
    return fixed, spaces


def plan_trials(spaces: dict, trials: int | None, seed: int) -> list[dict]:
    """The trials' values of the searched options, in the order they run. Only lists: the
    whole grid in a random order, or `trials` of its points drawn without repeats. With a range:
    `trials` (default 8) Latin-hypercube points, each list's values drawn as evenly."""
    if not spaces:
        raise ValueError("nothing to search: give at least one option a space, such as "
                         "--lr 1e-4:1e-2:log or --batch-size 32,64,128")
    if trials is not None and trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    rng = random.Random(seed)
    names = list(spaces)
    if all(isinstance(s, Choice) for s in spaces.values()):
        grid = [dict(zip(names, p, strict=True))
                for p in itertools.product(*(spaces[n].values for n in names))]
        # In a random order: an asynchronous scheduler lets the first trials at a rung go on
        # unopposed, and the grid's own order (its smallest values first) would pick them.
        return rng.sample(grid, min(trials or len(grid), len(grid)))
    n = trials or DEFAULT_TRIALS
    columns = {}
    for name in names:
        strata = list(range(n))
        rng.shuffle(strata)
        space = spaces[name]
        if isinstance(space, Range):
            columns[name] = [space.at((s + rng.random()) / n) for s in strata]
        else:  # each value as often as n allows, in a random order
            columns[name] = [space.values[s % len(space.values)] for s in strata]
    return [{name: columns[name][i] for name in names} for i in range(n)]


def trial_ids(n: int) -> list[str]:
    width = max(2, len(str(n - 1)))
    return [f"t{i:0{width}d}" for i in range(n)]


def shown(value) -> str:
    """A value as a table shows it: floats to 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
