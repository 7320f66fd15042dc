"""The fast target runner: own forward for the Llama family and Gemma 3, static KV cache, CUDA graph replay.

    from leapdecode.models.fast import FastRunner, supported
    runner = FastRunner(model.hf_model)          # or model.runner("fast"); model.runner("auto") picks it on CUDA
"""

from typing import Any

from leapdecode.models.fast.runner import FastConfig, FastRunner
from leapdecode.models.fast.weights import unsupported_reason


def supported(hf_model: Any) -> bool:
    """True when FastRunner can run this transformers model."""
    return unsupported_reason(hf_model) is None


__all__ = ["FastConfig", "FastRunner", "supported", "unsupported_reason"]
