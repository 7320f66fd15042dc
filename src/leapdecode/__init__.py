"""leapdecode: lossless parallel decoding for language models.

    from leapdecode import load_model, generate
    from leapdecode.drafters import PromptLookup
    model = load_model()                       # SmolLM2-135M-Instruct, the default preset
    out = generate(model, "Summarize: ...", drafter=PromptLookup())
    print(out.text, out.stats.mat)
"""

from leapdecode.decode import GenerationConfig, Generation, TextStream, generate, speculate, stream
from leapdecode.drafters.base import Draft, Drafter, StepResult
from leapdecode.models.base import Model, TargetRunner
from leapdecode.sampling import SamplingConfig
from leapdecode.stats import Stats


def load_model(name_or_path=None, **kwargs) -> Model:
    """Load a target model: a preset name, a .gguf file, a HF directory or an in-memory transformers model.

    See leapdecode.models.load.load_model for the options.
    """
    from leapdecode.models.load import load_model as _load

    return _load(name_or_path, **kwargs)


__all__ = ["Draft", "Drafter", "Generation", "GenerationConfig", "Model", "SamplingConfig", "Stats", "StepResult",
           "TargetRunner", "TextStream", "generate", "load_model", "speculate", "stream"]
__version__ = "0.1.0"
