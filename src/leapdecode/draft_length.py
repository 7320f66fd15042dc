"""How much to draft: per-sequence acceptance estimates and a measured step cost choose the draft length.

Used by the server's scheduler for a whole batch, and by chain drafters (pld; copy with adaptive=True) for one
request (`ChainLength`).

Speculation pays when the tokens it adds per step outweigh what the wider step costs. One sequence on a CPU is
memory-bound: verifying 8 rows costs little more than verifying 1, so drafting is nearly free. A batch of 16 is
already compute-bound: every extra row of every sequence costs time. So the choice depends on the batch, and on how
well each sequence's drafter has been doing.

- `AcceptanceEstimate` (one per sequence) tracks how often its drafter proposes when offered a budget (p) and how
  often a drafted position is accepted (a), as decayed counts with priors, so it follows the sequence's recent
  behaviour. Under a geometric model, offering k yields p (a + a^2 + ... + a^k) accepted tokens on average. The
  counts also decay on steps offered nothing, so a sequence that stopped drafting drifts back to the priors and is
  probed again later: a bad estimate cannot lock speculation off for good.
- `StepCost` prices a step: a curve of seconds by the rows of one sequence's step, plus a cost per further sequence
  in the step (a batched forward attends per sequence, against its own cache; `scripts/batch_cost.py` measures both,
  BENCHMARKS.md section 0d). Both are calibrated at start-up; the steps the server runs then teach it how much
  slower than that calibration its steps run under load (an offset for one sequence, factors for several).
- `choose_draft_length` picks the common draft length k that maximises expected emitted tokens per second for the
  whole batch: (B + sum_b E_b(k)) / cost(rows, B). k = 0 is plain decoding, whose value is B / cost(B, B), so k > 0
  is chosen only when the model of the step predicts more tokens per second than not speculating. A padded step
  (serve.batch_runner) is as wide as its widest sequence, so every sequence is offered the same k.
- `choose_draft_lengths` does the same per sequence for a runner without padding (models.fast.batch), where a row
  costs the same whichever sequence it belongs to: the rows go to the sequences whose next drafted position is
  likeliest to be accepted, as many as pay (so under load only the sequences that draft well draft at all).
`own_draft_length` is the batch-independent rule for requests that must be reproducible.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class AcceptanceEstimate:
    """Decayed counts, with priors, of how a sequence's drafter has been doing (one per sequence).

    Two rates: how often the drafter proposes anything when offered a budget (an n-gram drafter finds no match on
    fresh text), and how often a drafted position is accepted given its parent was. Both matter because a batch step
    is padded to its widest draft: a sequence whose drafter rarely proposes adds little but can still widen the step.
    """

    prior_rate: float = 0.6  # acceptance rate per position assumed before any evidence
    prior_proposal: float = 0.5  # share of offered steps with a draft, assumed before any evidence
    prior_weight: float = 2.0  # how many observations each prior is worth
    decay: float = 0.9  # per step: evidence older than ~10 steps fades
    tried: float = 0.0  # drafted positions tried (accepted + the rejected one)
    accepted: float = 0.0
    offered: float = 0.0  # steps with a budget > 0
    proposed: float = 0.0  # of those, steps with a draft

    def __post_init__(self) -> None:
        if not 0.0 <= self.prior_rate < 1.0:
            raise ValueError(f"prior_rate must be in [0, 1), got {self.prior_rate}")
        if not 0.0 <= self.prior_proposal <= 1.0:
            raise ValueError(f"prior_proposal must be in [0, 1], got {self.prior_proposal}")
        if self.prior_weight <= 0:
            raise ValueError(f"prior_weight must be > 0, got {self.prior_weight}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")

    @property
    def rate(self) -> float:
        """Estimated probability that a drafted position is accepted given its parent was."""
        rate = (self.accepted + self.prior_rate * self.prior_weight) / (self.tried + self.prior_weight)
        return min(rate, 0.99)  # keeps expected_accepted finite-looking and below k

    @property
    def proposal_rate(self) -> float:
        """Estimated probability that the drafter proposes something when offered a budget."""
        return (self.proposed + self.prior_proposal * self.prior_weight) / (self.offered + self.prior_weight)

    def observe(self, offered: int, drafted_depth: int, accepted: int) -> None:
        """After a step: the budget was `offered`, the draft reached `drafted_depth`, `accepted` positions were kept
        (bonus not counted). Positions tried = the accepted ones plus the one rejected, if the walk stopped before
        the draft's end."""
        for name in ("tried", "accepted", "offered", "proposed"):
            setattr(self, name, getattr(self, name) * self.decay)
        if offered:
            self.offered += 1
            self.proposed += 1 if drafted_depth else 0
        if drafted_depth:
            self.tried += accepted + (1 if accepted < drafted_depth else 0)
            self.accepted += accepted

    def gains(self, k: int) -> list[float]:
        """Probability that drafted position j = 1..k is accepted: proposal rate x a^j (non-increasing)."""
        a, p = self.rate, self.proposal_rate
        return [p * a**j for j in range(1, max(k, 0) + 1)]

    def expected_accepted(self, k: int) -> float:
        """Mean accepted tokens when offered k: proposal rate x (a + a^2 + ... + a^k) for a k-long chain."""
        return sum(self.gains(k))


@dataclass
class DrafterCalibration:
    """How a drafter's own acceptance estimates compare with what the target accepts: a factor that scales them.

    A drafter that estimates each node's chance (hybrid) may be optimistic or pessimistic on the text at hand; the
    server multiplies its estimates by (accepted + prior) / (predicted + prior), from decayed sums over recent
    steps, before it shares a step's rows out (choose_draft_lengths), kept within [low, high].
    """

    decay: float = 0.98  # per observed step: evidence older than a few dozen steps fades
    prior: float = 5.0  # tokens of evidence that the estimates are right (factor 1 until steps say otherwise)
    low: float = 0.25
    high: float = 1.5
    predicted: float = 0.0  # expected accepted tokens of the drafted nodes (the drafter's own, unscaled)
    accepted: float = 0.0

    @property
    def factor(self) -> float:
        return min(max((self.accepted + self.prior) / (self.predicted + self.prior), self.low), self.high)

    def observe(self, predicted: float, accepted: int) -> None:
        self.predicted = self.decay * self.predicted + predicted
        self.accepted = self.decay * self.accepted + accepted


@dataclass
class DrafterUpkeep:
    """What consulting a drafter costs the server per sequence and step, and whether its drafts pay for that.

    A drafter's own work is paid every step: its estimates for every sequence, its proposal and learning from the
    outcome for those given rows (a sequence given none leaves its drafter idle, where the drafter may skip steps);
    on a CPU serving many sequences it can outweigh what the few rows worth drafting gain. The scheduler
    judges every step: the expected tokens per second with the planned drafts and the drafters' own seconds,
    against plain decoding without them. After `patience` steps in a row that do not pay, the drafter rests:
    for `rest_steps` steps its sequences decode plainly without consulting it at all (for drafters that allow
    it: Drafter.skips_steps), then it is judged again. Outputs are unchanged either way; only speed is at stake.
    """

    decay: float = 0.9  # per observation of `seconds`
    patience: int = 4  # steps in a row that do not pay before the drafter rests
    rest_steps: int = 32  # steps it then sits out
    seconds: float | None = None  # decayed mean of its seconds per sequence and step (None before any)
    unpaid: int = 0  # steps in a row that did not pay
    resting: int = 0  # steps left to sit out

    def observe(self, seconds: float) -> None:
        self.seconds = seconds if self.seconds is None else self.decay * self.seconds + (1 - self.decay) * seconds

    def judge(self, pays: bool) -> None:
        self.unpaid = 0 if pays else self.unpaid + 1
        if self.unpaid >= self.patience:
            self.unpaid, self.resting = 0, self.rest_steps

    def rest(self) -> bool:
        """At the start of a step: whether the drafter sits this one out (counts the step off if so)."""
        if self.resting <= 0:
            return False
        self.resting -= 1
        return True


class StepCost:
    """Seconds per verification pass: curve(rows) + (sequences - 1) x per_sequence, corrected under load.

    The curve maps the rows of one sequence's step to seconds, piecewise linear between known points; beyond the
    largest point it grows in proportion to the rows (a compute-bound pass). `per_sequence` is what each further
    sequence in a step adds whatever its rows (its own attention and cache writes), as calibrated.

    A one-sequence step is priced as curve(rows) + offset, the offset learned from what such steps take (moved by
    `weight` of each step's error; 0 freezes it). Serving one request, the whole step runs slower than the quiet
    calibration by about the same time whatever its rows (BENCHMARKS.md 0g): the HTTP side and the client take
    their share of the cores. An offset keeps the calibrated price of a row; moving the curve only at the row
    counts the server uses (as before session 10) left the plain step at its quiet price while the drafted sizes
    rose, so a drafted row looked several times dearer than it is, and a lone request drafted too little.

    Steps of several sequences are priced as load x plain + row_load x extra: plain is the calibrated price of the
    step without drafts (one row per sequence), extra what the calibrated model adds for the drafted rows, and the
    two factors are learned from the steps the server runs: a least-squares line through measured / plain against
    extra / plain, from decayed sums (`batch_decay` per step), each factor pulled towards 1 by a prior
    (`prior_steps`). A server under load runs its steps slower than the quiet start-up calibration (load > 1), and
    a drafted row of a wide step can cost more than the one-sequence curve says, by more than the load alone
    (`leapdecode serve --trace`, BENCHMARKS.md 0g). One factor per kind of work keeps the calibrated model's shape
    and needs only plain and drafted steps to tell them apart; with one kind alone the prior holds the other.
    (Learning the per-sequence cost itself from such steps, as session 7's server did, mixed it with the curve's
    error and priced rows as cheap: BENCHMARKS.md 0d.)
    """

    prior_steps: float = 5.0  # steps of evidence that both factors are 1 (the calibrated model is right)
    batch_decay: float = 0.99  # per observed multi-sequence step: evidence older than ~100 steps fades
    factor_range: tuple[float, float] = (0.5, 4.0)  # load and row_load are kept within this range

    def __init__(self, points: dict[int, float], weight: float = 0.1, per_sequence: float = 0.0) -> None:
        if not points or any(n < 1 or t <= 0 for n, t in points.items()):
            raise ValueError(f"StepCost needs points {{rows >= 1: seconds > 0}}, got {points}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1] (0 = never learn), got {weight}")
        if per_sequence < 0:
            raise ValueError(f"per_sequence must be >= 0 seconds, got {per_sequence}")
        self.points = dict(points)
        self.weight = weight
        self.per_sequence = per_sequence
        self.offset = 0.0  # seconds every one-sequence step takes beyond the curve (learned)
        self.load = self.row_load = 1.0  # learned factors of multi-sequence steps (see the class docstring)
        # decayed sums of weight, x, z, x^2, x z over observed steps, x = extra / plain, z = measured / plain
        self._fit = [0.0] * 5
        self._monotone()

    @staticmethod
    def nominal() -> StepCost:
        """A fixed curve for one memory-bound sequence, in units of a plain step (no timing involved): each extra
        row up to 8 costs 2 % of a step (a draft must earn that), beyond 8 rows cost grows in proportion."""
        return StepCost({1: 1.0, 8: 1.14, 64: 8.0})

    def estimate(self, rows: int, sequences: int = 1) -> float:
        """Seconds of a step of `rows` rows in all, spread over `sequences` sequences."""
        plain, extra = self.calibrated(rows, sequences)
        return float(self._price(plain, extra, sequences))

    def estimates(self, rows: np.ndarray, sequences: int = 1) -> np.ndarray:
        """estimate() of every row count in `rows` (an integer array) at once."""
        ns = self._rows
        values = np.array([self.points[n] for n in ns])
        rows = np.asarray(rows, dtype=np.float64)
        curve = np.where(rows >= ns[-1], values[-1] * rows / ns[-1], np.interp(rows, ns, values))
        plain, base = self._plain(sequences)
        return self._price(plain, np.maximum(curve + base - plain, 0.0), sequences)

    def calibrated(self, rows: int, sequences: int = 1) -> tuple[float, float]:
        """The calibrated price of such a step in two parts: (its plain step, one row per sequence; what its
        drafted rows add), without the learned factors."""
        plain, base = self._plain(sequences)
        return plain, max(self.curve(rows) + base - plain, 0.0)

    def _plain(self, sequences: int) -> tuple[float, float]:
        """(calibrated seconds of a plain step of `sequences` sequences, the part of it the further sequences add)"""
        base = max(sequences - 1, 0) * self.per_sequence
        return self.curve(max(sequences, 1)) + base, base

    def _price(self, plain: float, extra, sequences: int):
        """The calibrated parts corrected by what was learned: the offset for one sequence, the factors for several
        (`extra` a float or an array)."""
        if sequences > 1:
            return self.load * plain + self.row_load * extra
        total = plain + extra
        return np.maximum(total + self.offset, 0.25 * total)

    def curve(self, rows: int) -> float:
        """Seconds of one sequence's step of `rows` rows."""
        ns = self._rows
        if rows <= ns[0]:
            return self.points[ns[0]]
        if rows >= ns[-1]:
            return self.points[ns[-1]] * rows / ns[-1]
        i = bisect.bisect_left(ns, rows)
        lo, hi = ns[i - 1], ns[i]
        if hi == rows:
            return self.points[hi]
        frac = (rows - lo) / (hi - lo)
        return self.points[lo] + frac * (self.points[hi] - self.points[lo])

    def observe(self, rows: int, seconds: float, sequences: int = 1) -> None:
        """A step of `rows` rows over `sequences` sequences took `seconds`: one sequence moves the offset (by
        `weight`), several move the factors load and row_load."""
        if rows < 1 or seconds <= 0 or self.weight <= 0:
            return
        if sequences == 1:
            self.offset += self.weight * (seconds - self.curve(rows) - self.offset)
            return
        plain, extra = self.calibrated(rows, sequences)
        x, z = extra / plain, seconds / plain
        self._fit = [self.batch_decay * s + v for s, v in zip(self._fit, (1.0, x, z, x * x, x * z))]
        self.load, self.row_load = self._solve()

    def _solve(self) -> tuple[float, float]:
        """The line z = load + row_load x that fits the observations, each factor pulled towards 1 (ridge): load
        by prior_steps steps, row_load by as many steps whose drafted rows add a third to their price (x^2 ~ 0.1)."""
        w, sx, sz, sxx, sxz = self._fit
        pull_load, pull_rows = self.prior_steps, 0.1 * self.prior_steps
        a11, a12, a22 = w + pull_load, sx, sxx + pull_rows
        b1, b2 = sz + pull_load, sxz + pull_rows
        det = a11 * a22 - a12 * a12  # > 0: both pulls are positive
        load, row_load = (b1 * a22 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det
        lo, hi = self.factor_range
        return min(max(load, lo), hi), min(max(row_load, lo), hi)

    def _monotone(self) -> None:
        """Keep the curve non-decreasing in rows (noise in the calibration must not make a wider step look cheaper
        than a narrower one): a running maximum."""
        highest = 0.0
        self._rows = sorted(self.points)  # the curve's known row counts, ascending
        for n in self._rows:
            highest = self.points[n] = max(self.points[n], highest)


def choose_draft_length(estimates: Sequence[AcceptanceEstimate], caps: Sequence[int], width: int, cost: StepCost,
                        max_draft: int, fixed: Sequence[tuple[AcceptanceEstimate, int]] = (),
                        padded: bool = True) -> int:
    """The draft length k in [0, max_draft] that maximises expected emitted tokens per second of the step.

    estimates / caps: the adaptive sequences and the most each may draft now (its remaining tokens and budget).
    width: sequences the pass spans (with a padded runner, including those that only carry padding this step).
    fixed: sequences whose draft length is already decided (estimate, length).
    padded: the pass computes width x (widest step) rows (serve.batch_runner); else each sequence's own rows
        (models.fast.batch): 1 + its draft, summed.
    """
    floor = max((k for _, k in fixed), default=0)  # a padded step is at least this wide anyway
    fixed_gain = sum(e.expected_accepted(k) for e, k in fixed)
    fixed_rows = sum(1 + k for _, k in fixed)
    emitting = len(estimates) + len(fixed)  # every sequence emits its bonus token
    best_k, best_rate = 0, -1.0
    for k in range(max_draft + 1):
        gain = fixed_gain + sum(e.expected_accepted(min(k, cap)) for e, cap in zip(estimates, caps))
        rows = width * (1 + max(k, floor)) if padded else fixed_rows + sum(1 + min(k, cap) for cap in caps)
        rate = (emitting + gain) / cost.estimate(rows, width)
        if rate > best_rate * (1.0 + 1e-9):  # prefer the shorter draft on ties
            best_k, best_rate = k, rate
    return best_k


def choose_draft_lengths(gains: Sequence[Sequence[float]], cost: StepCost,
                         fixed: Sequence[tuple[AcceptanceEstimate, int]] = ()) -> list[int]:
    """The lengths of plan_draft_lengths (see there)."""
    return plan_draft_lengths(gains, cost, fixed).lengths


@dataclass(frozen=True)
class RowPlan:
    """What plan_draft_lengths chose, and what it expects of the step with those drafts and without any."""

    lengths: list[int]  # draft nodes per adaptive sequence
    tokens: float  # expected tokens the step emits with them
    seconds: float  # the step's price with them
    plain_tokens: float  # ... and without any adaptive draft
    plain_seconds: float


def plan_draft_lengths(gains: Sequence[Sequence[float]], cost: StepCost,
                       fixed: Sequence[tuple[AcceptanceEstimate, int]] = ()) -> RowPlan:
    """Per-sequence draft lengths for a step without padding (each sequence costs its own 1 + k rows): the lengths
    that maximise expected emitted tokens per second of the step.

    gains[b][j]: the probability that the (j + 1)-th node of adaptive sequence b's draft is accepted, non-increasing
    in j, as many as it may draft now (its drafter's own estimates, Drafter.acceptance_estimates, or
    AcceptanceEstimate.gains). The rows are handed out in order of those probabilities, best first, and the step is
    cut after the prefix of that order with the highest expected rate; all zeros is plain decoding. fixed:
    (estimate, length) of sequences already decided.
    """
    sequences = len(gains) + len(fixed)
    base_rows = sequences + sum(k for _, k in fixed)
    base_gain = sequences + sum(e.expected_accepted(k) for e, k in fixed)  # every sequence emits its bonus token
    lengths = [0] * len(gains)
    base_seconds = cost.estimate(base_rows, sequences)
    values = np.array([float(g) for row in gains for g in row])  # [C] every candidate node's chance
    if not values.size:
        return RowPlan(lengths, base_gain, base_seconds, base_gain, base_seconds)
    owner = np.repeat(np.arange(len(gains)), [len(row) for row in gains])  # [C] its sequence
    depth = np.concatenate([np.arange(len(row)) for row in gains])  # [C] its place in its sequence's list
    order = np.lexsort((owner, depth, -values))  # most likely first; per sequence, node j before node j + 1
    order = order[values[order] > 0.0]
    gain = base_gain + np.cumsum(values[order])  # [C'] expected tokens with the first 1, 2, ... candidates
    rates = gain / cost.estimates(base_rows + np.arange(1, order.size + 1), sequences)  # [C']
    best, best_rate = 0, base_gain / base_seconds
    for taken, rate in enumerate(rates.tolist(), start=1):
        if rate > best_rate * (1.0 + 1e-9):  # prefer fewer rows on ties
            best, best_rate = taken, rate
    for b in owner[order[:best]].tolist():
        lengths[b] += 1
    tokens = float(gain[best - 1]) if best else base_gain
    return RowPlan(lengths, tokens, tokens / best_rate, base_gain, base_seconds)


class ChainLength:
    """Per-request draft length for a chain drafter: the k that maximises expected tokens per second, from the
    drafter's recent acceptance (AcceptanceEstimate) and the target's measured step latency (a budget.LatencyCurve).

    On a CPU a wider verify costs more (SmolLM2, 2-core machine, 256-token context: 9 rows ~2.2x a plain step),
    so a drafter that proposes 10 tokens
    whenever any 1-gram matches can make decoding slower than plain; this keeps drafts as long as they pay, and
    offers nothing (k = 0, plain decoding) while they do not, probing again as the evidence decays.
    """

    def __init__(self, curve) -> None:  # curve: leapdecode.budget.LatencyCurve
        self.cost = StepCost({size + 1: seconds for size, seconds in zip(curve.sizes, curve.seconds)}, weight=0.0)
        self.estimate = AcceptanceEstimate()
        self.offered = 0

    def reset(self) -> None:
        self.estimate, self.offered = AcceptanceEstimate(), 0

    def limit(self, budget: int) -> int:
        """The draft length to offer now, at most `budget`."""
        self.offered = choose_draft_length([self.estimate], [budget], 1, self.cost, budget) if budget > 0 else 0
        return self.offered

    def observe(self, drafted: int, accepted: int) -> None:
        """After the step: the chain had `drafted` tokens, `accepted` of them were kept."""
        self.estimate.observe(self.offered, drafted, accepted)


def chain_options(kwargs: dict, target=None, adaptive_default: bool = True) -> dict:
    """Registry entry of the chain drafters: with a target and adaptive on (the drafter's default when not given),
    load (or measure once) the target's latency curve, cached per model, device and dtype
    (see budget.cached_latency_curve)."""
    kwargs = dict(kwargs)
    from leapdecode.budget import LatencyCurve

    if kwargs.get("latency_curve") is not None and not isinstance(kwargs["latency_curve"], LatencyCurve):
        raise ValueError("option 'latency_curve' takes a measured leapdecode.budget.LatencyCurve (leapdecode "
                         "measures it from the target); it cannot be given as text: use adaptive=false to turn it off")
    if target is not None and kwargs.get("adaptive", adaptive_default) and kwargs.get("latency_curve") is None:
        from leapdecode.budget import cached_latency_curve

        kwargs["latency_curve"] = cached_latency_curve(target)
    return kwargs


def own_draft_length(estimate: AcceptanceEstimate, cap: int, max_draft: int) -> int:
    """A draft length that depends only on the sequence's own history (reproducible under any batch)."""
    return min(choose_draft_length([estimate], [cap], 1, StepCost.nominal(), max_draft), cap)
