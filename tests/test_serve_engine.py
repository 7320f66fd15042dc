"""The server's engine without HTTP: which drafter each request gets (shared forks, private drafters)."""

from __future__ import annotations

import pytest

from leapdecode.drafters.hybrid import Hybrid
from leapdecode.models.load import load_model
from leapdecode.serve.engine import Engine, ServeConfig
from leapdecode.serve.protocol import APIError, CompletionRequest
from serve_util import tiny_model_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(tiny_model_dir(tmp_path_factory.mktemp("engine")))


def test_shared_requests_fork_one_drafter_unless_seeded(model):
    engine = Engine(model, ServeConfig(served_name="tiny", drafter="hybrid", share_drafter_state=True))
    a, b = engine.make_drafter(None), engine.make_drafter("hybrid")
    assert isinstance(a, Hybrid) and a is not b
    assert a.recycling.table is b.recycling.table and a.chain_stats.at_risk is b.chain_stats.at_risk
    assert a.lookup is not b.lookup
    # a seeded sampling request gets a drafter of its own: what others teach the shared one cannot change its text
    ids, config, private = engine.prepare(CompletionRequest(model="tiny", prompt="Hello", temperature=0.8, seed=3))
    assert config.sampling.seed == 3 and private.recycling.table is not a.recycling.table
    _, _, greedy = engine.prepare(CompletionRequest(model="tiny", prompt="Hello", temperature=0))
    assert greedy.recycling.table is a.recycling.table
    # drafters that cannot fork are built per request; a bad name is still a 400 naming the drafter
    assert engine.make_drafter("pld") is not engine.make_drafter("pld")
    with pytest.raises(APIError, match="drafter 'nope'"):
        engine.make_drafter("nope")
    # off (the default): every request builds its own
    alone = Engine(model, ServeConfig(served_name="tiny", drafter="hybrid"))
    assert alone.make_drafter(None).recycling.table is not alone.make_drafter(None).recycling.table


def test_an_unwritable_trace_path_is_refused_by_name(model, tmp_path):
    with pytest.raises(ValueError, match="cannot write the trace file .*writable path"):
        Engine(model, ServeConfig(served_name="tiny", drafter="none", trace=str(tmp_path)))  # a directory
