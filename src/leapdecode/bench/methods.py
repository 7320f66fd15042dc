"""The methods a benchmark compares: leapdecode drafters and Hugging Face `generate` baselines.

Every method answers the same call, `generate(prompt_ids, max_new_tokens, sampling) -> Run`, so the harness treats
them alike. New tokens are counted the same way for all: up to (not including) the first of the model's EOS ids,
at most max_new_tokens; wall seconds include the prefill. On a GPU the clock is read only after synchronising.

Method names on the command line: any leapdecode drafter (`leapdecode drafters` lists them) and
  hf-greedy    model.generate(do_sample=False): transformers' own plain decoding
  hf-pld       model.generate(prompt_lookup_num_tokens=10): transformers' prompt lookup decoding
  hf-assisted  model.generate(assistant_model=...): transformers' assisted generation (needs --assistant MODEL)
Options: `--option NAME.KEY=VALUE`, e.g. `--option pld.max_ngram=4 --option hf-pld.prompt_lookup_num_tokens=5`.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from leapdecode.decode import GenerationConfig, speculate
from leapdecode.drafters.registry import make_drafter
from leapdecode.drafters.registry import names as drafter_names
from leapdecode.models.base import Model, TargetRunner
from leapdecode.sampling import SamplingConfig
from leapdecode.stats import Stats

BASELINE = "none"  # every output is compared with this method's, and speed-ups are measured against it
HF_GREEDY = "hf-greedy"
# Hugging Face baselines and the generate() options each accepts (with the defaults the harness passes).
HF_METHODS: dict[str, dict[str, Any]] = {
    "hf-greedy": {},
    "hf-pld": {"prompt_lookup_num_tokens": 10, "max_matching_ngram_size": 2},
    "hf-assisted": {"num_assistant_tokens": 20, "num_assistant_tokens_schedule": "constant"},
}


@dataclass
class Run:
    """One generation, as the harness records it."""

    tokens: list[int]  # new tokens, EOS excluded
    seconds: float  # wall time, prefill included
    stats: dict | None = None  # leapdecode Stats.to_dict(); None for methods that do not count steps
    peak_memory_bytes: int = 0
    drafter_state_bytes: int | None = None


class Method(Protocol):
    """What the harness runs. `kind` is "leapdecode" (steps and MAT known) or "hf" (only tokens and time)."""

    name: str
    kind: str
    options: dict

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig) -> Run: ...


@dataclass(frozen=True)
class MethodSpec:
    name: str
    options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in drafter_names() and self.name not in HF_METHODS:
            raise ValueError(f"unknown method {self.name!r}; available: drafters {', '.join(drafter_names())} "
                             f"and baselines {', '.join(HF_METHODS)}")


def parse_methods(methods: str, options: Sequence[str] = ()) -> list[MethodSpec]:
    """"none,pld,hf-pld" and ["pld.max_ngram=4"] -> method specs; `none` is added first when missing (it is the
    reference for exactness and speed-up)."""
    listed = [m.strip() for m in methods.split(",") if m.strip()]
    if not listed:
        raise ValueError("--drafters must name at least one method, e.g. none,pld,copy,hf-greedy")
    duplicates = sorted({m for m in listed if listed.count(m) > 1})
    if duplicates:
        raise ValueError(f"method {duplicates[0]!r} is listed twice in --drafters")
    if BASELINE not in listed:
        listed.insert(0, BASELINE)
    per_method: dict[str, dict[str, str]] = {m: {} for m in listed}
    for pair in options:
        target, dot, rest = pair.partition(".")
        key, eq, value = rest.partition("=")
        if not dot or not eq or not key.strip():
            raise ValueError(f"--option {pair!r} is not METHOD.KEY=VALUE (e.g. pld.max_ngram=4)")
        if target not in per_method:
            raise ValueError(f"--option {pair!r} is for {target!r}, which is not among the methods "
                             f"({', '.join(listed)})")
        per_method[target][key.strip().replace("-", "_")] = value.strip()
    return [MethodSpec(m, per_method[m]) for m in listed]


def build_method(spec: MethodSpec, model: Model, runner: TargetRunner, *, assistant: Model | None = None,
                 budget: int = 64) -> Method:
    """A ready-to-run method for `spec` on `model` (leapdecode methods share `runner`; each gets its own drafter,
    which then persists across the questions of the run)."""
    if spec.name in HF_METHODS:
        return HFMethod(spec.name, model, _hf_options(spec), assistant=assistant)
    options: dict[str, Any] = dict(spec.options)
    if spec.name == "draft-model" and "model" not in options:
        if assistant is None:
            raise ValueError("drafter 'draft-model' needs a draft model: pass --assistant MODEL")
        options["model"] = assistant
    drafter = make_drafter(spec.name, options, target=model, device=str(model.device),
                           dtype=str(model.dtype).removeprefix("torch."))
    return LeapdecodeMethod(spec.name, drafter, runner, model.eos_token_ids, dict(spec.options), budget)


def _hf_options(spec: MethodSpec) -> dict[str, Any]:
    defaults = HF_METHODS[spec.name]
    unknown = set(spec.options) - set(defaults)
    if unknown:
        raise ValueError(f"method {spec.name!r} has no option {sorted(unknown)[0]!r}; its options: "
                         f"{', '.join(defaults) or 'none'}")
    out = dict(defaults)
    for key, value in spec.options.items():
        try:
            out[key] = type(defaults[key])(value)
        except ValueError:
            raise ValueError(f"method {spec.name!r} option {key!r} must be a {type(defaults[key]).__name__}, "
                             f"got {value!r}") from None
    return out


# ------------------------------------------------------------------------------------------------------ methods


class LeapdecodeMethod:
    """A leapdecode drafter run through the decode loop on token ids (no text decoding inside the timed part)."""

    kind = "leapdecode"

    def __init__(self, name: str, drafter, runner: TargetRunner, eos_token_ids: Sequence[int], options: dict,
                 budget: int = 64) -> None:
        self.name, self.drafter, self.runner, self.options = name, drafter, runner, options
        self.eos_token_ids = tuple(eos_token_ids)
        self.budget = budget

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig) -> Run:
        config = GenerationConfig(max_new_tokens=max_new_tokens, sampling=sampling, budget=self.budget)
        stats = Stats()
        device = self.runner.device
        with MemoryWatch(device) as memory:
            tokens = [t for step in speculate(self.runner, prompt_ids, self.drafter, config, self.eos_token_ids,
                                              stats) for t in step]
            synchronize(device)
        state = getattr(self.drafter, "state_bytes", None)
        return Run(tokens, stats.total_seconds, stats.to_dict(), memory.peak, None if state is None else int(state()))


class HFMethod:
    """A transformers `generate` baseline on the same model object, stopping on the same EOS ids."""

    kind = "hf"

    def __init__(self, name: str, model: Model, options: dict[str, Any], assistant: Model | None = None) -> None:
        if name == "hf-assisted" and assistant is None:
            raise ValueError("method 'hf-assisted' needs a draft model: pass --assistant MODEL")
        self.name, self.model, self.options = name, model, options
        self.assistant = assistant
        if not model.eos_token_ids:
            raise ValueError(f"model {model.name!r} names no EOS token; HF baselines need one to stop and to pad")

    def _kwargs(self, sampling: SamplingConfig) -> dict[str, Any]:
        eos = list(self.model.eos_token_ids)
        kwargs: dict[str, Any] = {"eos_token_id": eos, "pad_token_id": eos[0], "num_beams": 1}
        if sampling.greedy:
            kwargs["do_sample"] = False
        else:  # the same warping as leapdecode's SamplingConfig; top_k=0 / top_p=1.0 switch HF's defaults off
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k,
                          top_p=sampling.top_p)
        if self.name == "hf-pld":
            kwargs.update(self.options)
        elif self.name == "hf-assisted":
            kwargs["assistant_model"] = self.assistant.hf_model
            # the assistant reads its drafting schedule from its own generation config
            self.assistant.hf_model.generation_config.num_assistant_tokens = self.options["num_assistant_tokens"]
            self.assistant.hf_model.generation_config.num_assistant_tokens_schedule = \
                self.options["num_assistant_tokens_schedule"]
        return kwargs

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig) -> Run:
        device = self.model.device
        input_ids = torch.tensor([prompt_ids], device=device)  # [1, L]
        kwargs = self._kwargs(sampling)
        if not sampling.greedy and sampling.seed is not None:
            torch.manual_seed(sampling.seed)  # HF samples from the global generator
        with MemoryWatch(device) as memory:
            synchronize(device)
            start = time.perf_counter()
            out = self.model.hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                               max_new_tokens=max_new_tokens, **kwargs)  # [1, L + new]
            synchronize(device)
            seconds = time.perf_counter() - start
        new = out[0, len(prompt_ids):].tolist()
        eos = set(self.model.eos_token_ids)
        cut = next((i for i, t in enumerate(new) if t in eos), len(new))
        return Run(new[:cut], seconds, None, memory.peak, None)


# ------------------------------------------------------------------------------------------------------ helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryWatch:
    """Peak memory during a block: allocated GPU memory on CUDA; on CPU the process's resident-set high-water mark
    (coarse: it never goes down, so it is the peak of the whole process so far)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> MemoryWatch:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            self.peak = int(rss if sys.platform == "darwin" else rss * 1024)
