"""Per-request statistics, as plain data that benchmarks and the server read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Stats:
    drafter: str = "none"
    prompt_tokens: int = 0
    new_tokens: int = 0  # tokens emitted (accepted + bonus), after stop truncation
    steps: int = 0  # target verification passes (prefill excluded)
    draft_tokens: int = 0  # draft nodes proposed in total
    accepted_tokens: int = 0  # draft nodes accepted in total
    drafted_per_depth: list[int] = field(default_factory=list)  # [d] steps whose draft reached depth d + 1
    accepted_per_depth: list[int] = field(default_factory=list)  # [d] steps that accepted a token at depth d + 1
    prefill_seconds: float = 0.0
    drafter_seconds: float = 0.0  # propose + observe
    target_seconds: float = 0.0  # verify + accept + commit
    total_seconds: float = 0.0  # wall time of the whole request, prefill included
    stop_reason: str = ""  # "eos", "length" or "stop"
    extra: dict = field(default_factory=dict)  # drafter- or runner-specific facts (e.g. a chosen tree budget)

    def record_step(self, draft_depth: int, draft_nodes: int, accepted: int) -> None:
        self.steps += 1
        self.draft_tokens += draft_nodes
        self.accepted_tokens += accepted
        _bump(self.drafted_per_depth, draft_depth)
        _bump(self.accepted_per_depth, accepted)

    @property
    def mat(self) -> float:
        """Mean tokens the target produced per step: accepted drafts + the bonus (plain decoding: exactly 1.00).

        Counted before stop truncation, so an EOS or a step cut at max_new_tokens does not pull it below what
        the step verified; tokens/s uses the emitted `new_tokens` instead."""
        return (self.accepted_tokens + self.steps) / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def acceptance_per_depth(self) -> list[float]:
        """Share of steps that drafted depth d + 1 and had it accepted."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_depth, self.drafted_per_depth)]

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(mat=self.mat, tokens_per_second=self.tokens_per_second,
                   acceptance_per_depth=self.acceptance_per_depth)
        return out


def _bump(counts: list[int], depth: int) -> None:
    """Add one to counts[0 .. depth - 1], growing the list as needed."""
    if len(counts) < depth:
        counts.extend([0] * (depth - len(counts)))
    for d in range(depth):
        counts[d] += 1
