"""The empty drafter: every step verifies only the root, which is plain autoregressive decoding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from leapdecode.drafters.base import Draft, StepResult
from leapdecode.sampling import SamplingConfig


class NoDrafter:
    name = "none"
    description = "no drafting: plain autoregressive decoding through the same loop (the honest baseline)"

    def reset(self, prompt: Sequence[int], sampling: SamplingConfig) -> None:
        pass

    def propose(self, context: Sequence[int], budget: int) -> Draft:
        return Draft.empty()

    def acceptance_estimates(self, context: Sequence[int], budget: int) -> np.ndarray:
        """No node to estimate: the server gives this request no draft rows without weighing any."""
        return np.zeros(0)

    def observe(self, step: StepResult) -> None:
        pass
