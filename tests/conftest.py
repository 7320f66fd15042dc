"""Shared fixtures: the real default model, loaded once per session, and tiny random-weight models.

The real model is not optional: CI installs its package. If it is missing, tests that use it fail and say how to
install it, rather than skipping and letting "lossless on the real model" go silently untested.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from leapdecode.models.base import Model
from leapdecode.models.load import load_model
from leapdecode.models.tiny import ARCHS, tiny_model

# The test machines have two cores shared by everything; more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_ARCHS = ARCHS  # ("llama", "qwen2", "gemma3")


@pytest.fixture(scope="session")
def smollm2() -> Model:
    """SmolLM2-135M-Instruct (the default preset), float32 on CPU. The first run on a machine builds its cache."""
    try:
        return load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    except ImportError as err:
        pytest.fail(f"the bundled SmolLM2 model is required: {err}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Model]:
    """One tiny float32 random-weight model per architecture in TINY_ARCHS, seed 0, vocabulary 64, no tokenizer."""
    return {arch: tiny_model(arch) for arch in TINY_ARCHS}


@pytest.fixture(params=TINY_ARCHS)
def tiny(request: pytest.FixtureRequest, tiny_models: dict[str, Model]) -> Model:
    """Parametrised over TINY_ARCHS: a test using `tiny` runs once per architecture. Shared; do not modify."""
    return tiny_models[request.param]


@contextlib.contextmanager
def _torch_threads(n: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny models run many small forwards dominated by per-op overhead: one intra-op thread avoids waking a second
    one for every op (many times the work itself on a busy two-core machine). The setting is restored afterwards."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """one_thread for a whole module (use with pytestmark = pytest.mark.usefixtures("one_thread_module"))."""
    with _torch_threads(1):
        yield
