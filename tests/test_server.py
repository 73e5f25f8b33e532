"""The OpenAI-compatible server, run as users run it: `python main.py` in a subprocess, driven over HTTP with the
official `openai` client and with raw `httpx` for the malformed requests a client library refuses to send."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from medusa_gguf.decoding import GenerationResult, SamplingParams
from medusa_gguf.engine import Engine
from medusa_gguf.pool import QueueFull, SlotPool
from medusa_gguf.server import _Choice, _run_choices, create_app
from medusa_gguf.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
N_CTX = 1024
COUNTING = "1, 2, 3, 4,"  # greedy continuation: " 5, 6, 7, ..." (3 tokens per number) with no end in sight


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp_path_factory, name: str, **env: str):
    port = _free_port()
    folder = tmp_path_factory.mktemp(name)
    log_path = folder / "server.log"
    full_env = {k: v for k, v in os.environ.items() if k != "API_KEY"}
    # One llama.cpp thread: with two, a decode step stalls whenever another process holds a core (16 tokens took
    # 20 s on this shared 2-core machine); with one it just runs slower. Drafting on (TREE=default: the shipped
    # heads with the static tree; TREE=auto decodes plainly on this machine). A cache directory of its own.
    full_env.update({"N_CTX": str(N_CTX), "N_THREADS": "1", "PORT": str(port), "TREE": "default",
                     "XDG_CACHE_HOME": str(folder / "cache"), **env})
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, env=full_env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240  # a first start measures the step cost model (cached afterwards)
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server not ready within 240 s:\n{log_path.read_text()}")
        time.sleep(0.1)
    return proc, url, log_path


def _stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Four slots batched in one context, a deep queue, an API key."""
    proc, url, log_path = _start_server(
        tmp_path_factory, "main", N_PARALLEL="4", MAX_QUEUE="32", API_KEY=KEY
    )
    yield url
    _stop_server(proc)
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One slot and room for one waiting request, no API key."""
    proc, url, log_path = _start_server(tmp_path_factory, "single", N_PARALLEL="1", MAX_QUEUE="1")
    yield url
    _stop_server(proc)
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def _chat(client, model, content, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def _stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join((c.choices[0].delta.content or "") if c.choices and hasattr(c.choices[0], "delta")
                   else (c.choices[0].text if c.choices else "") for c in chunks)
    return text, chunks


# -- happy paths ---------------------------------------------------------------------------------------------------

def test_models_lists_the_model_file_and_its_stem(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1"]


def test_chat_completion(client, model):
    resp = _chat(client, model, "What is the capital of France?", max_tokens=12, temperature=0)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == model
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 5 and 0 < resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    medusa = resp.model_extra["medusa"]
    assert medusa["mode"] == "medusa" and medusa["heads_used"]  # the shipped heads draft (TREE=default)
    assert medusa["steps"] >= 1 and medusa["tau"] >= 1


def test_chat_stream_matches_non_stream(client, model):
    args = dict(max_tokens=10, temperature=0)
    plain = _chat(client, model, "Name three colors.", **args)
    stream = _chat(client, model, "Name three colors.", stream=True, stream_options={"include_usage": True}, **args)
    text, chunks = _stream_text(stream)
    assert text == plain.choices[0].message.content
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_completion_and_its_stream(client, model):
    resp = client.completions.create(model=model, prompt=COUNTING, max_tokens=6, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].text == " 5, 6,"
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 6
    text, chunks = _stream_text(
        client.completions.create(model=model, prompt=COUNTING, max_tokens=6, temperature=0, stream=True)
    )
    assert text == " 5, 6," and chunks[-1].choices[0].finish_reason == "length"


def test_raw_stream_is_openai_sse_ending_with_done(http):
    body = {"prompt": COUNTING, "max_tokens": 3, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    last = json.loads(events[-3][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length" and "medusa" in last


def test_completions_default_to_16_tokens(client, model):
    resp = client.completions.create(model=model, prompt=COUNTING, temperature=0)
    assert resp.usage.completion_tokens == 16 and resp.choices[0].finish_reason == "length"


def test_stop_strings_end_the_text_and_never_appear(client, model):
    resp = client.completions.create(model=model, prompt=COUNTING, max_tokens=12, temperature=0, stop=[" 7", "zz"])
    assert resp.choices[0].text == " 5, 6," and resp.choices[0].finish_reason == "stop"
    text, _ = _stream_text(
        client.completions.create(model=model, prompt=COUNTING, max_tokens=12, temperature=0, stop=",", stream=True)
    )
    assert text == " 5"
    full = _chat(client, model, "Describe the sea.", max_tokens=16, temperature=0).choices[0].message.content
    word = full.split()[3]
    cut = _chat(client, model, "Describe the sea.", max_tokens=16, temperature=0, stop=word, stream=True)
    text, chunks = _stream_text(cut)
    assert text == full[: full.index(word)] and word not in text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_greedy_output_equals_engine_in_process(client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    served_chat = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    served_text = client.completions.create(model=model, prompt="The sea is", max_tokens=16, temperature=0)
    engine = Engine(Settings(n_ctx=N_CTX, n_threads=1, tree="default"))  # 2 threads crawl when others hold the cores
    try:
        params = SamplingParams(max_tokens=16, temperature=0)
        chat = "".join(engine.generate(engine.chat_prompt(messages), params, GenerationResult()))
        text = "".join(engine.generate(engine.tokenize("The sea is"), params, GenerationResult()))
    finally:
        engine.close()
    assert served_chat.choices[0].message.content == chat
    assert served_text.choices[0].text == text


def test_seeded_sampling_is_reproducible_and_n_uses_seed_plus_i(client, model):
    args = dict(model=model, prompt="My favourite animal is", max_tokens=8, temperature=1.0, seed=7)
    one = client.completions.create(**args)
    assert client.completions.create(**args).choices[0].text == one.choices[0].text
    two = client.completions.create(**args, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == one.choices[0].text
    assert two.choices[1].text == client.completions.create(**{**args, "seed": 8}).choices[0].text
    assert two.usage.prompt_tokens == one.usage.prompt_tokens


# -- bad input -----------------------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
BAD = [
    # (route, body (a str is sent raw), status, param)
    (CHAT, '{"messages": [', 400, None),
    (CHAT, "[1, 2]", 400, None),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": USER, "max_tokens": "16"}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "max_tokens": -1}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "max_tokens": N_CTX + 1}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "max_tokens": 4, "max_completion_tokens": 5}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": USER, "temperature": 2.5}, 400, "temperature"),
    (CHAT, {"messages": USER, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": USER, "top_k": -1}, 400, "top_k"),
    (CHAT, {"messages": USER, "n": 0}, 400, "n"),
    (CHAT, {"messages": USER, "n": 17}, 400, "n"),
    (CHAT, {"messages": USER, "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": USER, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (CHAT, {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (CHAT, {"messages": USER, "stop": [""]}, 400, "stop"),
    (CHAT, {"messages": USER, "stop": 3}, 400, "stop"),
    (CHAT, {"messages": USER, "model": "gpt-4o"}, 404, "model"),
    (CHAT, {"messages": USER, "logprobs": True}, 400, "logprobs"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "logit_bias": {"42": 5}}, 400, "logit_bias"),
    (CHAT, {"messages": USER, "presence_penalty": 0.5}, 400, "presence_penalty"),
    (CHAT, {"messages": USER, "frequency_penalty": 1}, 400, "frequency_penalty"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, 400, "response_format"),
    (CHAT, {"messages": USER, "banana": 1}, 400, "banana"),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "mood": "x"}]}, 400, "messages[0].mood"),
    (CHAT, {"messages": [{"role": "user", "content": "hello " * 1500}]}, 400, "messages"),
    (COMP, {"max_tokens": 4}, 400, "prompt"),
    (COMP, {"prompt": 42}, 400, "prompt"),
    (COMP, {"prompt": "hi", "echo": True}, 400, "echo"),
    (COMP, {"prompt": "hi", "best_of": 2}, 400, "best_of"),
    (COMP, {"prompt": "hi", "suffix": "end"}, 400, "suffix"),
    (COMP, {"prompt": "hi", "logprobs": 1}, 400, "logprobs"),
    (COMP, {"prompt": "hi", "model": "nope"}, 404, "model"),
    (COMP, {"prompt": "hello " * 1500}, 400, "prompt"),
]


@pytest.mark.parametrize("route, body, status, param", BAD, ids=[f"{r[0][4:]}-{i}" for i, r in enumerate(BAD)])
def test_bad_request_gets_an_openai_error_and_the_server_stays_up(http, route, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = http.post(route, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert http.get("/health").status_code == 200


def test_too_long_prompt_error_names_both_sizes(http):
    r = http.post(COMP, json={"prompt": "hello " * 1500})
    error = r.json()["error"]
    sizes = [int(x) for x in re.findall(r"\d+", error["message"])]
    assert N_CTX in sizes and any(s > N_CTX for s in sizes) and error["code"] == "context_length_exceeded"


def test_defaults_still_serve_after_bad_requests(http):
    r = http.post(COMP, json={"prompt": COUNTING, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " 5,"


def test_unsupported_parameters_at_their_defaults_are_accepted(http):
    body = {"messages": USER, "max_tokens": 2, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0,
            "logit_bias": {}, "user": "u1", "n": 1, "stop": None, "seed": -3}
    assert http.post(CHAT, json=body).status_code == 200


# -- auth, health, metrics -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_v1_routes_need_the_api_key(server, headers):
    for method, route in [("GET", "/v1/models"), ("POST", CHAT), ("POST", COMP)]:
        r = httpx.request(method, server + route, headers=headers, json={"prompt": "hi"}, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    assert httpx.get(server + "/metrics").status_code == 200


def test_openai_client_with_a_wrong_key_gets_authentication_error(server, model):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        _chat(bad, model, "hi", max_tokens=2)


def test_unknown_model_is_not_found_error(client):
    with pytest.raises(openai.NotFoundError):
        _chat(client, "gpt-4o", "hi", max_tokens=2)


def _metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _wait_for_metric(url: str, name: str, ok, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not ok(_metric(url, name)):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_metrics_count_requests_tokens_steps_and_latency(server, client, model, http):
    assert http.post(CHAT, json={"messages": []}).status_code == 400
    before = _metric(server, "medusa_completion_tokens_total")
    resp = client.completions.create(model=model, prompt=COUNTING, max_tokens=5, temperature=0)
    assert _metric(server, "medusa_completion_tokens_total") - before == resp.usage.completion_tokens == 5
    assert _metric(server, "medusa_requests_total", '{route="/v1/completions",status="200"}') >= 1
    assert _metric(server, "medusa_requests_total", '{route="/v1/chat/completions",status="400"}') >= 1
    assert _metric(server, "medusa_tokens_per_step_count") >= 1
    assert re.search(r"^medusa_guard_plain_steps_total \S+$", httpx.get(f"{server}/metrics").text, re.M)
    assert _metric(server, "medusa_time_to_first_token_seconds_count", '{route="/v1/completions"}') >= 1
    assert _metric(server, "medusa_request_latency_seconds_count", '{route="/v1/completions"}') >= 1
    assert "medusa_queue_depth 0.0" in httpx.get(f"{server}/metrics").text


# -- concurrency ---------------------------------------------------------------------------------------------------

def test_twenty_concurrent_streams_match_their_sequential_runs(client, model):
    jobs = [
        dict(messages=[{"role": "user", "content": f"Say something about the number {i}."}], max_tokens=6,
             **({"temperature": 0} if i % 2 else {"temperature": 0.8, "seed": i}))
        for i in range(20)
    ]
    sequential = [client.chat.completions.create(model=model, **job).choices[0].message.content for job in jobs]
    barrier = threading.Barrier(len(jobs))

    def run(job):
        barrier.wait()
        return _stream_text(client.chat.completions.create(model=model, stream=True, **job))[0]

    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(run, jobs))
    assert concurrent == sequential
    assert len(set(sequential)) > 10  # the prompts really differ


def test_client_disconnect_mid_stream_frees_the_slot(single):
    body = {"prompt": COUNTING, "max_tokens": N_CTX - 16, "temperature": 0, "stream": True}
    with httpx.Client(base_url=single, timeout=30) as c:
        with c.stream("POST", COMP, json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # generating: hang up now
    _wait_for_metric(single, "medusa_cancelled_generations_total", lambda v: v >= 1, "the generation went on")
    _wait_for_metric(single, "medusa_slots_busy", lambda v: v == 0, "the slot was not given back")
    r = httpx.post(single + COMP, json={"prompt": COUNTING, "max_tokens": 3, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " 5,"


def _raw_post(url: str, route: str, body: dict) -> socket.socket:
    """Send a request on a bare socket, so the test decides exactly when the client hangs up (close())."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    head = f"POST {route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
    sock.sendall(head.encode() + b"\r\n\r\n" + data)
    return sock


def test_client_leaving_while_queued_or_waiting_for_a_full_reply_is_cancelled(single):
    long = {"prompt": COUNTING, "max_tokens": N_CTX - 16, "temperature": 0}
    left_queue = '{route="/v1/completions",status="499"}'
    gone_before = _metric(single, "medusa_requests_total", left_queue)
    cancelled_before = _metric(single, "medusa_cancelled_generations_total")
    with httpx.Client(base_url=single, timeout=30) as c:
        with c.stream("POST", COMP, json={**long, "stream": True}) as r:
            lines = r.iter_lines()  # held: dropping the iterator would close the stream
            next(lines)  # the only slot is busy with this stream
            queued = _raw_post(single, COMP, long)
            _wait_for_metric(single, "medusa_queue_depth", lambda v: v == 1, "the request did not queue")
            queued.close()  # hang up while queued: leave the queue without ever running
            _wait_for_metric(single, "medusa_queue_depth", lambda v: v == 0, "the request stayed in the queue")
            assert _metric(single, "medusa_requests_total", left_queue) == gone_before + 1
    _wait_for_metric(single, "medusa_slots_busy", lambda v: v == 0, "the stream kept its slot")
    waiting = _raw_post(single, COMP, long)  # not streaming: hang up while it generates
    _wait_for_metric(single, "medusa_slots_busy", lambda v: v == 1, "the request did not start")
    waiting.close()
    _wait_for_metric(single, "medusa_cancelled_generations_total", lambda v: v == cancelled_before + 2,
                     "a generation outlived its client")
    _wait_for_metric(single, "medusa_slots_busy", lambda v: v == 0, "the slot was not given back")
    r = httpx.post(single + COMP, json={"prompt": COUNTING, "max_tokens": 3, "temperature": 0}, timeout=60)
    assert r.status_code == 200


def test_full_queue_gives_503_with_retry_after(single):
    barrier = threading.Barrier(4)

    def post(_):
        barrier.wait()
        return httpx.post(single + COMP, json={"prompt": COUNTING, "max_tokens": 32, "temperature": 0}, timeout=60)

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(post, range(4)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 503, 503]  # one running, one waiting (MAX_QUEUE=1), two turned away
    busy = [r for r in responses if r.status_code == 503]
    for r in busy:
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "queue_full"
    ok = [r.json()["choices"][0]["text"] for r in responses if r.status_code == 200]
    assert ok[0] == ok[1]
    assert httpx.get(single + "/health").status_code == 200
    assert _metric(single, "medusa_requests_total", '{route="/v1/completions",status="503"}') == 2


def test_single_server_needs_no_key(single):
    r = httpx.post(single + CHAT, json={"messages": USER, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


def test_a_list_of_prompts_gives_one_choice_each(client, model):
    prompts = [COUNTING, "A, B, C,"]
    resp = client.completions.create(model=model, prompt=prompts, max_tokens=3, temperature=0)
    alone = [client.completions.create(model=model, prompt=p, max_tokens=3, temperature=0) for p in prompts]
    assert [c.text for c in resp.choices] == [a.choices[0].text for a in alone]
    assert [c.index for c in resp.choices] == [0, 1] and resp.choices[0].text == " 5,"
    assert resp.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)


# -- in-process, with a fake engine -------------------------------------------------------------------------------

class FakeEngine:
    """Echoes the prompt's words, one per token (`delay` seconds each); the word 'boom' makes it fail
    mid-generation; a prompt starting with 'slow' blocks its tokenization until `proceed` is set."""

    model_name = "fake.gguf"
    n_ctx = 1024

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.made = 0  # tokens generated, all requests together
        self.running = 0  # generations under way
        self.tokenizing = 0
        self.proceed = threading.Event()

    def tokenize(self, text):
        if text.startswith("slow"):
            self.tokenizing += 1
            self.proceed.wait(timeout=30)
            self.tokenizing -= 1
        return [ord(ch) for ch in text]

    def chat_prompt(self, messages):
        return self.tokenize(messages[-1]["content"])

    def generate(self, tokens, params, result, cancelled=None):
        self.running += 1
        try:
            for word in "".join(map(chr, tokens)).split()[: params.max_tokens]:
                if cancelled is not None and cancelled():
                    return
                time.sleep(self.delay)
                if word == "boom":
                    raise RuntimeError("the engine broke")
                self.made += 1
                result.tokens.append(len(result.tokens))
                result.text += word + " "
                yield word + " "
            result.finish_reason = "length"
        finally:
            self.running -= 1


def test_a_failing_generation_harms_no_other_request():
    app = create_app(Settings(max_queue=4), slots=[FakeEngine()])

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            bad = await c.post(COMP, json={"prompt": "one boom", "max_tokens": 5})
            assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
            streamed = await c.post(COMP, json={"prompt": "one boom", "max_tokens": 5, "stream": True})
            events = [json.loads(e[6:]) for e in streamed.text.split("\n\n") if e]
            assert events[0]["choices"][0]["text"] == "one " and "the engine broke" in events[-1]["error"]["message"]
            ok = await c.post(CHAT, json={"messages": [{"role": "user", "content": "one two three"}], "max_tokens": 5})
            assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "one two three "

    asyncio.run(main())


def test_pool_lends_slots_first_come_first_served_and_bounds_the_queue():
    async def main():
        pool = SlotPool(["slot"], max_queue=3)
        held = await pool.acquire()
        order = []

        async def wait(i):
            slot = await pool.acquire()
            order.append(i)
            pool.release(slot)

        tasks = [asyncio.create_task(wait(i)) for i in range(3)]
        await asyncio.sleep(0)
        assert (pool.waiting, pool.busy) == (3, 1)
        with pytest.raises(QueueFull) as full:
            await pool.acquire()
        assert full.value.retry_after_s >= 1
        tasks[1].cancel()  # a waiter that gives up leaves the queue
        await asyncio.sleep(0)
        assert pool.waiting == 2
        pool.release(held)
        await asyncio.gather(tasks[0], tasks[2])
        assert order == [0, 2] and (pool.waiting, pool.busy) == (0, 0)

    asyncio.run(main())


def test_bad_setting_exits_with_a_clear_message():
    env = {**os.environ, "N_PARALLEL": "0"}
    out = subprocess.run([sys.executable, "main.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "N_PARALLEL=0 is out of range" in out.stderr and "Traceback" not in out.stderr


# -- the faults a code reading found: each test failed before its fix ---------------------------------------------

async def _until(check, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def test_a_stream_whose_client_left_before_the_first_chunk_generates_nothing():
    """The client is gone before the response starts: the stream's body never runs, so no generation may."""
    fake = FakeEngine(delay=0.05)  # 50 tokens: 2.5 s
    app = create_app(Settings(max_queue=4), slots=[fake])
    body = json.dumps({"prompt": " ".join(["w"] * 50), "max_tokens": 50, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": COMP, "raw_path": COMP.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")], "client": ("test", 1),
             "server": ("test", 80)}

    async def main():
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}  # gone at once

        async def send(message):
            if message["type"] == "http.response.start":
                assert message["status"] == 200, message

        await app(scope, receive, send)
        await asyncio.sleep(0.5)  # a generation left running is still running now
        return fake.running, fake.made

    running, made = asyncio.run(main())
    assert running == 0 and made < 10, f"the abandoned stream kept generating ({made} tokens so far)"


def test_preparing_a_prompt_holds_no_slot():
    """A request whose tokenization is slow (or that is cancelled meanwhile) cannot hold up or share a slot."""
    fake = FakeEngine()
    app = create_app(Settings(max_queue=4), slots=[fake])

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            slow = asyncio.create_task(c.post(COMP, json={"prompt": "slow one", "max_tokens": 2}))
            await _until(lambda: fake.tokenizing == 1, "the slow request did not start tokenizing")
            quick = await asyncio.wait_for(c.post(COMP, json={"prompt": "one two", "max_tokens": 2}), 10)
            assert quick.status_code == 200 and quick.json()["choices"][0]["text"] == "one two "
            fake.proceed.set()
            assert (await slow).json()["choices"][0]["text"] == "slow one "

    asyncio.run(main())


class _CancelAfter:
    """An Event whose is_set() turns true from its n-th call on (the cancel flag of a client that left)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls >= self.n

    def set(self) -> None:
        self.n = 0


def test_cancel_stops_a_generation_whose_text_the_stop_scanner_holds_back():
    """The text " 5, 6, 7, ..." keeps matching the start of the stop string, so no piece is emitted; the cancel
    must still stop it before the next step."""
    engine = Engine(Settings(n_ctx=128, n_threads=2, tree="default"), slots=1)
    try:
        (view,) = engine.views()
        stop = " 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20 x"
        params = SamplingParams(max_tokens=48, temperature=0, stop=(stop,))
        events, results = [], []
        _run_choices(view, [_Choice(0, view.tokenize(COUNTING), params)], events.append, _CancelAfter(4),
                     results.append)
        assert events == [] and len(results) == 1
        assert len(results[0].tokens) < 24, f"{len(results[0].tokens)} tokens after the cancel"
        assert engine.batcher.active == 0
    finally:
        engine.close()


def test_a_queued_stream_sends_keep_alive_comments():
    fake = FakeEngine(delay=0.5)
    app = create_app(Settings(max_queue=4, sse_keepalive_s=1), slots=[fake])

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            busy = asyncio.create_task(c.post(COMP, json={"prompt": "a b c d e f", "max_tokens": 6}))
            await _until(lambda: fake.running == 1, "the first request did not start")
            streamed = await c.post(COMP, json={"prompt": "one two", "max_tokens": 2, "stream": True})
            assert (await busy).status_code == 200
        return streamed.text

    text = asyncio.run(main())
    events = text.split("\n\n")
    first_data = next(i for i, e in enumerate(events) if e.startswith("data: "))
    assert first_data >= 1 and all(e.startswith(": keep-alive") for e in events[:first_data]), events[:first_data + 1]
    assert events[-2] == "data: [DONE]"
