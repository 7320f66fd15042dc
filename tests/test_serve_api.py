"""The HTTP server as a real process on 127.0.0.1 (tiny random-weight model with SmolLM2's real tokenizer):
authentication, malformed requests, context limits, queue limits, disconnects and SIGTERM draining.

Outputs of a random model are gibberish, which is fine here: these tests are about the server's behaviour. What
the model says is tested with the real SmolLM2 in test_serve_real.py.
"""

from __future__ import annotations

import signal

import httpx
import pytest

from leapdecode.serve.process import ServerProcess
from serve_util import metric, sse_events, tiny_model_dir, wait_for

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


LONG = 4000  # tokens of a request that must still be running when the test acts on it (several seconds)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # wide enough that a step takes about a millisecond: a LONG request runs for seconds, not a fraction of one
    return tiny_model_dir(tmp_path_factory.mktemp("serve"), hidden_size=256, intermediate_size=512, head_dim=64)


@pytest.fixture(scope="module")
def server(model_dir):
    """Two batch slots, a queue of one, a 4096-token context; API key from the environment."""
    proc = ServerProcess(["--model", str(model_dir), "--served-model-name", "tiny", "--max-batch", "2",
                          "--max-waiting", "1", "--max-context", "4096", "--max-tokens-limit", str(LONG),
                          "--threads", "1"], env={"LEAPDECODE_API_KEY": KEY})
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
        yield c


def test_auth(server):
    # /health is open (load balancers probe it); everything else needs the bearer key
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(f"{server}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{server}/v1/models", headers=AUTH)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    ('{"model": "tiny"}', 400, "prompt"),
    ('{"model": "gpt-4", "prompt": "hi"}', 404, "model"),
    ('{"model": "tiny", "prompt": "hi", "max_tokens": -1}', 400, "max_tokens"),
    ('{"model": "tiny", "prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    ('{"model": "tiny", "prompt": "hi", "max_tokens": 1000000}', 400, "max_tokens"),  # above --max-tokens-limit
    ('{"model": "tiny", "prompt": "hi", "max_tokens": "5"}', 400, "max_tokens"),
    ('{"model": "tiny", "prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    ('{"model": "tiny", "prompt": "hi", "temperature": -1}', 400, "temperature"),
    ('{"model": "tiny", "prompt": "hi", "top_p": 0}', 400, "top_p"),
    ('{"model": "tiny", "prompt": "hi", "stream": "yes"}', 400, "stream"),
    ('{"model": "tiny", "prompt": "hi", "n": 2}', 400, "n"),
    ('{"model": "tiny", "prompt": "hi", "stop": [""]}', 400, "stop"),
    ('{"model": "tiny", "prompt": "hi", "drafter": "no-such-drafter"}', 400, "drafter"),
    ('{"model": "tiny", "prompt": "hi", "presence_penalty": 0.5}', 400, "presence_penalty"),
    ('{"model": "tiny", "prompt": 42}', 400, "prompt"),
])
def test_malformed_completions(client, body, status, param):
    r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "user"}], "messages"),
    ([{"role": "wizard", "content": "hi"}], "messages"),
    ([{"role": "user", "content": 7}], "messages"),
])
def test_malformed_chat(client, messages, param):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_prompt_longer_than_context(client):
    long_text = "the " * 4200  # about 4200 tokens; the context is 4096
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": long_text, "max_tokens": 8})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 8,
                                                  "messages": [{"role": "user", "content": long_text}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    # a prompt that fits, but not with the tokens asked for, names the prompt too (prompt + max_tokens > context)
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "the " * 4000, "max_tokens": 200})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    # and the server keeps serving
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "The lighthouse", "max_tokens": 5,
                                             "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def running(server) -> float:
    return metric(server, "leapdecode_requests_running", AUTH)


def cancelled(server) -> float:
    return metric(server, "leapdecode_request_finish_total", AUTH, reason="cancelled")


def test_disconnect_mid_stream_frees_the_slot(server, client):
    before = cancelled(server)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": LONG, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r)  # keep a reference: a collected generator would close the stream early
        first = next(e for e in events if e["choices"][0]["text"])
        assert first["object"] == "text_completion"
        assert running(server) == 1
    # the stream is closed after one piece of LONG tokens: the server notices and drops the sequence
    assert wait_for(lambda: running(server) == 0 and cancelled(server) == before + 1)
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Again", "max_tokens": 3})
    assert r.status_code == 200


def test_queue_limit_answers_429(server, client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": LONG,
            "ignore_eos": True, "stream": True}
    streams, readers = [], []  # keep references: a collected event generator would close its stream
    try:
        for _ in range(2):  # both slots: wait until each has produced text, i.e. is running
            cm = client.stream("POST", "/v1/chat/completions", json=body)
            streams.append(cm)
            readers.append(sse_events(cm.__enter__()))
            next(e for e in readers[-1] if e["choices"][0]["delta"].get("content"))
        cm = client.stream("POST", "/v1/chat/completions", json=body)  # queued: its first (role) chunk comes
        streams.append(cm)
        readers.append(sse_events(cm.__enter__()))
        assert next(readers[-1])["choices"][0]["delta"]["role"] == "assistant"
        assert metric(server, "leapdecode_requests_waiting", AUTH) == 1
        r = client.post("/v1/chat/completions", json={**body, "stream": False})  # queue of 1 is full
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)
    assert wait_for(lambda: running(server) == 0 and metric(server, "leapdecode_requests_waiting", AUTH) == 0)
    assert metric(server, "leapdecode_requests_total", AUTH, endpoint="/v1/chat/completions", status="429") == 1


def test_sigterm_drains_running_requests(model_dir):
    proc = ServerProcess(["--model", str(model_dir), "--max-batch", "2", "--threads", "1"])
    try:
        url = proc.wait_ready()
        body = {"model": "default", "prompt": "Count with me:", "max_tokens": 120, "ignore_eos": True,
                "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            events = sse_events(r)
            next(e for e in events if e["choices"][0]["text"])  # it is running
            proc.signal(signal.SIGTERM)  # graceful shutdown: no new connections, running requests finish
            rest = list(events)
        assert rest[-1] == "[DONE]"
        final = rest[-2]
        assert final["choices"][0]["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 120
        assert proc.wait(timeout=120) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
        assert "Application shutdown complete." in "\n".join(proc.log)
    finally:
        proc.stop()


def test_loadgen_against_the_server(server):
    # the load generator end to end: every request succeeds, and greedy texts are identical with speculation on
    # (drafter copy) and off (none), request by request
    from leapdecode.serve.loadgen import markdown, run_benchmark

    prompts = ["Tell me about lighthouses.", "The the the the the", "One, two, three,"]
    results = run_benchmark(server, "tiny", prompts, requests=3, levels=[1, 2], drafter="copy", max_tokens=12,
                            api_key=KEY)
    assert [(r.concurrency, r.drafter) for r in results] == [(1, "none"), (1, "copy"), (2, "copy"), (2, "none")]
    summary = [(r.drafter, r.concurrency, [(x.completion_tokens, x.error) for x in r.results]) for r in results]
    assert all(len(r.ok) == 3 and r.tokens_per_second > 0 for r in results), summary
    report = markdown(results, "copy", {"model": "tiny"})
    assert "Greedy outputs identical with speculation on and off: 6/6." in report
    # rounds: each level on and off twice, the order alternating per round; the report adds the rounds up
    results = run_benchmark(server, "tiny", prompts, requests=2, levels=[2], drafter="copy", max_tokens=8,
                            api_key=KEY, rounds=2)
    assert [(r.drafter, r.round) for r in results] == [("none", 0), ("copy", 0), ("copy", 1), ("none", 1)]
    report = markdown(results, "copy", {"model": "tiny"})
    assert "| 2 | on (copy) | 4/4 |" in report
    assert "Greedy outputs identical with speculation on and off: 4/4." in report
    assert report.count("- concurrency 2, speed-up per round: ") == 1 and report.count("x, ") == 1
    with pytest.raises(ValueError, match="rounds"):
        run_benchmark(server, "tiny", prompts, requests=1, levels=[1], drafter="copy", max_tokens=4, rounds=0)
