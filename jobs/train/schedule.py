"""How long a training run is, how its learning rate moves, and when it validates.

A run is set by steps (--epochs, --max-steps) or by time (--time-limit), whichever ends first.
Under a time limit the total is not known up front: it is estimated from the measured step
rate after the first steps and re-estimated as the run goes, so the learning rate reaches its
floor when the clock runs out, as a plain loop that knows its budget decays it. Pure Python:
the loop all-reduces the estimate so that every worker takes the same steps at the same rate."""

from __future__ import annotations

import math
from dataclasses import dataclass

WARMUP_STEPS, WARMUP_SHARE = 20, 0.02
# SGD's warm-up (the ResNets'): the standard ResNet recipe's 200 steps, at most a tenth of the
# run (a short run would spend itself warming up).
SGD_WARMUP = (200, 0.1)
RATE_FROM_STEP = 5  # the first steps pay for allocations and kernel selection
VAL_SHARE = 0.1  # of a time budget, at most, spent validating
MAX_EVALS = 12


def warmup_steps(total: float | None, most: int = WARMUP_STEPS,
                 share: float = WARMUP_SHARE) -> int:
    """Linear warm-up over `most` steps, and at most `share` of a run whose length is known
    (a time-limited run's as it is estimated): by default 20 steps, at most 2%."""
    if not total or not math.isfinite(total):
        return most
    return max(1, min(most, int(total * share)))


def lr_at(step: int, total: float, peak: float, warm: int = WARMUP_STEPS,
          cooldown: float = 1.0) -> float:
    """Linear warm-up, the peak held, then a straight line to zero at step `total` over its
    last `cooldown` share (warm-up, stable, decay). cooldown 1.0 is the ResNet recipe's linear
    decay from the start; Adam on a char-RNN wants its rate high for longer (a 2x256 LSTM
    ended worse with a linear decay from 2e-3 than with 2e-3 held constant, and better still
    with 4e-3 and the last 30% decayed; measured: BENCHMARKS.md, Training section)."""
    if step < warm:
        return peak * (step + 1) / warm
    if not math.isfinite(total):
        return peak
    left = 1.0 - (step - warm) / max(1.0, total - warm)  # share of the schedule still to run
    return peak * max(0.0, min(1.0, left / cooldown))


@dataclass
class Budget:
    max_steps: int | None  # from --epochs / --max-steps; None: time alone ends the run
    time_s: float | None  # --time-limit: training and validation seconds, all attempts
    start_step: int = 0  # steps done when this attempt began (resume)

    def __post_init__(self):
        self.total = float(self.max_steps) if self.max_steps else math.inf
        self.rate_from: tuple[int, float] | None = None  # (step, train seconds) then
        self.val_s: float | None = None  # mean seconds of one validation
        self.evals = 0  # validations done in this attempt
        self.last_eval_p = 0.0  # progress at the last validation

    @property
    def by_time(self) -> bool:
        """Validation by milestones of the time budget rather than at every epoch's end."""
        return self.time_s is not None and self.max_steps is None

    def planned_evals(self) -> int:
        """How many validations fit VAL_SHARE of the time budget (at least two)."""
        if not self.val_s or not self.time_s:
            return 8
        return max(2, min(MAX_EVALS, int(VAL_SHARE * self.time_s / self.val_s)))

    def milestones(self) -> list[float]:
        """Progress (step / total) of each validation: denser towards the end, where the model
        improves fastest and the best checkpoint is chosen; the last one at 1."""
        n = self.planned_evals()
        return [1.0 - (1.0 - k / n) ** 2 for k in range(1, n + 1)]

    def eval_due(self, step: int) -> bool:
        """The next milestone past the last validation is reached (the plan can change as the
        validation time is measured; a validation never follows another at once)."""
        if not self.by_time:
            return False
        ahead = self.ahead()
        return step / self.total >= (ahead[0] if ahead else 1.0)

    def ahead(self) -> list[float]:
        """The milestones still to come: past the last validation, and no more of them than
        the plan has left (the last one, at 1, always stays)."""
        left = max(1, self.planned_evals() - self.evals)
        return [m for m in self.milestones() if m > self.last_eval_p + 1e-9][-left:]

    def record_eval(self, seconds: float, step: int) -> None:
        self.val_s = seconds if self.val_s is None else (
            (self.val_s * self.evals + seconds) / (self.evals + 1))
        self.evals += 1
        self.last_eval_p = step / self.total

    def estimate(self, step: int, train_s: float, elapsed_s: float) -> float:
        """This worker's estimate of the run's total steps. train_s: seconds spent in training
        steps in this attempt; elapsed_s: training and validation time of all attempts.
        Under a time limit: the steps done plus those that fit the time left at the measured
        rate (the validations still to come kept out of it), and never more than the share
        of the budget already spent allows, so that a run that slows down still reaches the
        end of its schedule when the clock does."""
        if self.time_s is None:
            return self.total
        if self.rate_from is None:
            if step - self.start_step >= RATE_FROM_STEP:
                self.rate_from = (step, train_s)
            return self.total
        s0, t0 = self.rate_from
        if step - s0 < RATE_FROM_STEP or train_s <= t0:
            return self.total
        rate = (step - s0) / (train_s - t0)  # steps per second of training
        reserved = (max(1, len(self.ahead())) if self.by_time else 1) * (self.val_s or 0.0)
        left = self.time_s - elapsed_s - reserved
        spent = (elapsed_s + reserved) / self.time_s  # share of the budget used or promised
        total = min(step + rate * max(0.0, left), step / min(1.0, max(spent, 1e-9)))
        return min(total, float(self.max_steps)) if self.max_steps else total
