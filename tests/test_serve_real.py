"""`leapdecode serve` with the real SmolLM2-135M-Instruct, called with the official `openai` client.

One server process for the module (8 batch slots, default drafter copy, drafter state shared between requests).
Greedy responses are compared with offline `generate` (plain decoding, the same model in this process): a
completion must be exactly the text the model writes alone, whatever else the server is doing. The load test sends
64 chat requests, 8 at a time, with different prompts, lengths and drafters, so sequences join and leave the batch
at every step.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from leapdecode import GenerationConfig, SamplingConfig, generate
from leapdecode.serve.process import ServerProcess
from serve_util import metric, wait_for

pytestmark = pytest.mark.real

PASSAGE = (
    "The lighthouse on Carrow Point was built in 1871 from granite quarried two miles inland and hauled to the "
    "cliff on sledges. For ninety years three keepers lived in the cottages at its foot, taking turns to trim the "
    "wick and wind the clockwork that turned the lens. In 1962 the light was converted to electricity and the "
    "keepers left. The cottages stood empty until 2004, when a local trust restored them as a small museum.")
PROMPTS = [  # written for these tests; the passage one is longer than a prefill chunk (128 tokens)
    "What is the capital of France? Answer in one sentence.",
    f"Summarize this passage in two sentences.\n\n{PASSAGE}",
    "Write a Python function that returns the sum of the squares of a list of numbers.",
    "List three fruits that are red.",
    "Explain in one sentence why the sky is blue.",
    "Translate to French: The museum opens at ten o'clock.",
    "Repeat exactly: one two three four five six seven eight nine ten.",
    "Give two tips for sleeping better.",
]
MAX_TOKENS = 16


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(["--max-batch", "8", "--max-waiting", "64", "--share-drafter-state"])
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=1200)  # a bound, not a target


@pytest.fixture(scope="module")
def offline(smollm2):
    """Plain greedy decoding of each prompt (as chat) alone: the tokens every server response must reproduce."""
    config = GenerationConfig(max_new_tokens=MAX_TOKENS)
    return [generate(smollm2, chat(p), None, config).tokens for p in PROMPTS]


def expected_text(model, tokens: list[int], max_tokens: int) -> str:
    """What a request with `max_tokens` must return: the first max_tokens tokens (fewer if EOS came first)."""
    return model.decode(tokens[:max_tokens])


def test_completion_matches_offline(client, smollm2):
    prompt = "The three primary colours are"
    want = generate(smollm2, prompt, None, GenerationConfig(max_new_tokens=12), chat=False)
    r = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text
    assert r.usage.completion_tokens == len(want.tokens)
    assert r.usage.prompt_tokens == len(smollm2.encode(prompt, chat=False))
    info = r.model_extra["leapdecode"]  # per-request speculation facts
    assert info["drafter"] == "copy" and info["steps"] >= 1 and info["mat"] >= 1.0


def test_chat_and_streaming_match_offline(client, smollm2, offline):
    want = expected_text(smollm2, offline[0], MAX_TOKENS)
    r = client.chat.completions.create(model="default", messages=chat(PROMPTS[0]), max_tokens=MAX_TOKENS,
                                       temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="default", messages=chat(PROMPTS[0]), max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_stop_sequences(client, smollm2, offline):
    full = expected_text(smollm2, offline[6], MAX_TOKENS)  # "Repeat exactly: one two three ..."
    stop = "four"
    assert stop in full, full  # the offline answer contains the stop string, so the server must cut there
    want = full[: full.index(stop)]
    for streaming in (False, True):
        r = client.chat.completions.create(model="default", messages=chat(PROMPTS[6]), max_tokens=MAX_TOKENS,
                                           temperature=0, stop=[stop, "never-appears"], stream=streaming)
        if streaming:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            text, finish = r.choices[0].message.content, [r.choices[0].finish_reason]
        assert text == want and finish == ["stop"]


def test_seeds(client, smollm2):
    def sample(seed: int, drafter: str = "copy") -> str:
        r = client.chat.completions.create(model="default", messages=chat(PROMPTS[7]), max_tokens=12, temperature=0.9,
                                           top_p=0.95, seed=seed, extra_body={"drafter": drafter})
        return r.choices[0].message.content

    first = sample(123)
    assert sample(123) == first  # the same seed reproduces the same sample
    # a seeded request gets a private drafter even where requests share one (hybrid), so others cannot change it
    assert sample(123, "hybrid") == sample(123, "hybrid")
    assert any(sample(seed) != first for seed in (124, 125))  # other seeds draw other samples
    # with drafter none the request consumes its generator exactly as offline plain sampling with that seed does
    config = GenerationConfig(max_new_tokens=12, sampling=SamplingConfig(temperature=0.9, top_p=0.95, seed=123))
    assert sample(123, "none") == generate(smollm2, chat(PROMPTS[7]), None, config).text


def test_load_64_requests_8_at_a_time_match_offline(server, client, smollm2, offline):
    before = metric(server, "leapdecode_request_finish_total", reason="length") + \
        metric(server, "leapdecode_request_finish_total", reason="stop")
    # every prompt with every length (4 to 16 tokens) and a mix of drafters
    # (hybrid requests are forks of one shared drafter: they learn from each other while running together)
    jobs = [(i % len(PROMPTS), (4, 8, 12, 16)[(i // 8) % 4], ("copy", "pld", "none", "hybrid")[(i + i // 8) % 4])
            for i in range(64)]  # every prompt meets every drafter

    def run(job):
        index, max_tokens, drafter = job
        r = client.chat.completions.create(model="default", messages=chat(PROMPTS[index]), max_tokens=max_tokens,
                                           temperature=0, extra_body={"drafter": drafter})
        return r.choices[0].message.content, r.model_extra["leapdecode"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    mismatches = [(job, text) for job, (text, _) in zip(jobs, results)
                  if text != expected_text(smollm2, offline[job[0]], job[1])]
    assert not mismatches, f"{len(mismatches)}/64 differ from offline generate, e.g. {mismatches[:3]}"
    finished = metric(server, "leapdecode_request_finish_total", reason="length") + \
        metric(server, "leapdecode_request_finish_total", reason="stop")
    assert finished - before == 64
    # speculation happened and is reported: the copy and pld requests had drafts verified
    assert metric(server, "leapdecode_draft_tokens_total") > 0
    assert metric(server, "leapdecode_mean_acceptance_length") >= 1.0
    assert metric(server, "leapdecode_time_to_first_token_seconds_count") >= 64
    assert metric(server, "leapdecode_requests_running") == 0


def test_client_killed_mid_stream(server, client):
    before = metric(server, "leapdecode_request_finish_total", reason="cancelled")
    code = (
        "import sys; from openai import OpenAI\n"
        f"c = OpenAI(base_url='{server}/v1', api_key='unused', max_retries=0)\n"
        "for chunk in c.chat.completions.create(model='default', messages=[{'role': 'user', 'content': "
        "'Write a long story about a lighthouse.'}], max_tokens=1500, temperature=0, stream=True,\n"
        "                                        extra_body={'ignore_eos': True}):\n"
        "    if chunk.choices[0].delta.content:\n"
        "        print('piece', flush=True)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "piece"  # it is receiving the stream
        assert metric(server, "leapdecode_requests_running") == 1
        child.kill()  # no goodbye: the connection just drops
        child.wait(30)
    finally:
        child.kill()
        child.stdout.close()
    assert wait_for(lambda: metric(server, "leapdecode_requests_running") == 0
                    and metric(server, "leapdecode_request_finish_total", reason="cancelled") == before + 1)
    r = client.chat.completions.create(model="default", messages=chat("Say hi."), max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
