"""The OpenAI-compatible server (llamabind[server]) driven by the official ``openai`` client on
127.0.0.1, as a user would: chat and completions, streamed and not, tools, JSON schema,
log-probabilities, concurrent requests batched by the engine, a client that goes away, error
statuses, embeddings; and its benchmark end to end against llama-server on the tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import urllib.error
import urllib.request
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import llamabind as lb
from conftest import TEMPLATES
from llamabind.engine import Engine
from tinymodels import write_tiny_llama

import openai  # the test extra brings openai, starlette and uvicorn
import uvicorn

from llamabind.server import create_app

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ASK = [{"role": "user", "content": "Weather in Paris?"}]
# A template whose generation prompt is empty: a JSON grammar needs no prefix the tiny vocabulary
# cannot give (its <|im_start|> is a control token, which grammars reject, as in llama-server).
PLAIN = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, Any]:
    """A plain HTTP call: the status and the JSON body."""
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Spy:
    """Every event the engine's step produced, recorded as it happens (the engine itself runs as usual)."""

    def __init__(self, engine: Engine) -> None:
        self.done: dict[int, lb.DoneEvent] = {}
        self.max_batch = 0  # the most requests that got a token in one step
        self.max_rid = 0
        step = engine.step

        def spied() -> list:
            events = step()
            got = {e.index for e in events if isinstance(e, lb.TokenEvent) and e.token is not None}
            self.max_batch = max(self.max_batch, len(got))
            for e in events:
                self.max_rid = max(self.max_rid, e.index)
                if isinstance(e, lb.DoneEvent):
                    self.done[e.index] = e
            return events

        engine.step = spied  # type: ignore[method-assign]

    def wait_done(self, rid: int, timeout: float = 20.0) -> lb.DoneEvent:
        end = time.monotonic() + timeout
        while rid not in self.done and time.monotonic() < end:
            time.sleep(0.02)
        return self.done[rid]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run ``app`` on uvicorn in a thread on 127.0.0.1; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(30)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_path, chat_templates_dir):
    """A tiny model with Qwen3's template behind the server (4 slots), the tiny llama as embedding model."""
    path = write_tiny_llama(tmp_path_factory.mktemp("srv") / "qwen3-tiny.gguf",
                            template=(TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text())
    with lb.Model(path) as model:
        engine = Engine.load(model, n_slots=4, n_ctx=2048, n_threads=2)
        spy = Spy(engine)
        app = create_app(engine, model_name="tiny", embedding_model=tiny_model_path, embedding_name="tiny-embed",
                         embedding_pooling="mean", n_threads=2)
        with serving(app) as url:
            yield url, engine, spy


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def _stream(chunks) -> tuple[list, Any]:
    got = list(chunks)
    usage = [c.usage for c in got if c.usage is not None]
    return got, usage[-1] if usage else None


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list()] == ["tiny", "tiny-embed"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert http("GET", served[0] + "/health") == (200, {"status": "ok"})


def test_chat_streamed_and_not(served, client):
    _, engine, spy = served
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True, "enable_thinking": False})
    done = spy.wait_done(spy.max_rid)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    ch = r.choices[0]
    assert ch.finish_reason == "length" and ch.message.role == "assistant"
    assert ch.message.content == done.message.content and r.usage.completion_tokens == 8 == len(done.tokens)
    assert r.usage.prompt_tokens == done.usage.prompt_tokens and r.usage.total_tokens == r.usage.prompt_tokens + 8

    chunks, usage = _stream(client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "enable_thinking": False}))
    done = spy.wait_done(spy.max_rid)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert usage.completion_tokens == 8 and usage.prompt_tokens == r.usage.prompt_tokens
    # the same conversation again: its prompt comes from the KV cache
    assert usage.prompt_tokens_details.cached_tokens == done.usage.cached_tokens > 0


def test_completions_text_and_tokens(served, client):
    _, engine, spy = served
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    done = spy.wait_done(spy.max_rid)
    assert r.object == "text_completion" and r.choices[0].text == done.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    toks = [int(t) for t in engine.ctx.vocab.tokenize("hello world")]
    chunks, usage = _stream(client.completions.create(model="tiny", prompt=toks, max_tokens=6, temperature=0.7,
                                                      seed=3, top_p=0.9, frequency_penalty=0.5,
                                                      presence_penalty=0.2, stream=True,
                                                      stream_options={"include_usage": True},
                                                      extra_body={"ignore_eos": True, "top_k": 20, "min_p": 0.0,
                                                                  "repeat_penalty": 1.1}))
    done = spy.wait_done(spy.max_rid)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.text
    assert usage.prompt_tokens == len(toks) and usage.completion_tokens == 6


def test_tool_call_streamed_and_not(served, client):
    """The tiny model is made to say the call by a literal grammar (llama-server's ``grammar``);
    the template's own lazy tool grammar and parser run as for any model."""
    grammar = "root ::= " + json.dumps(CALL)
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, max_tokens=100, temperature=0,
              extra_body={"grammar": grammar, "chat_template_kwargs": {"enable_thinking": False}})
    r = client.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    call = ch.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris"} and not ch.message.content

    chunks = list(client.chat.completions.create(stream=True, **kw))
    parts = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert parts[0].function.name == "get_weather" and parts[0].id and parts[0].index == 0
    assert json.loads("".join(p.function.arguments or "" for p in parts)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_schema_response_format(tmp_path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    path = write_tiny_llama(tmp_path / "plain.gguf", template=PLAIN)
    with lb.Model(path) as model, serving(create_app(model, n_slots=1, n_ctx=512, n_threads=2)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        for seed in (1, 2):
            r = c.chat.completions.create(model="plain", messages=ASK, max_tokens=60, seed=seed,
                                          response_format={"type": "json_schema",
                                                           "json_schema": {"name": "r", "schema": schema}})
            assert r.choices[0].finish_reason == "stop"
            assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)


def test_a_model_without_a_jinja_template_chats_in_plain_text(gemma_path):
    """gemma3-270m's GGUF has no template: llama.cpp's built-in gemma format renders the chat, and
    the text is the content."""
    with lb.Model(gemma_path) as model:
        engine = Engine.load(model, n_slots=1, n_ctx=512, n_threads=2)
        spy = Spy(engine)
        with serving(create_app(engine, model_name="gemma")) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
            chunks = list(c.chat.completions.create(model="gemma", messages=ASK, max_tokens=6, stream=True,
                                                    temperature=0, extra_body={"ignore_eos": True}))
            done = spy.wait_done(spy.max_rid)
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == done.text != ""
            with pytest.raises(openai.BadRequestError):  # tools need a Jinja template
                c.chat.completions.create(model="gemma", messages=ASK, tools=TOOLS)


def test_logprobs(served, client):
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True, "enable_thinking": False})
    lps = r.choices[0].logprobs.content
    assert len(lps) == 5 == r.usage.completion_tokens
    for lp in lps:
        assert len(lp.top_logprobs) == 3 and lp.logprob <= 0
        assert [t.logprob for t in lp.top_logprobs] == sorted((t.logprob for t in lp.top_logprobs), reverse=True)
        best = lp.top_logprobs[0]  # greedy: the chosen token is the best one
        assert lp.token == best.token and lp.logprob == pytest.approx(best.logprob)
        assert bytes(lp.bytes).decode("utf-8", "replace") == lp.token
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, temperature=0,
                                                 logprobs=True, stream=True,
                                                 extra_body={"ignore_eos": True, "enable_thinking": False}))
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [lp.token for lp in streamed] == [lp.token for lp in lps]

    r = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 2 and lp.tokens[i] in t and lp.token_logprobs[i] == pytest.approx(max(t.values()))
               for i, t in enumerate(lp.top_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]


def test_concurrent_requests_share_the_batch(served, client):
    _, engine, spy = served
    spy.max_batch = 0
    out: dict[int, Any] = {}
    together = threading.Barrier(4)

    def one(i: int) -> None:
        together.wait()
        out[i] = client.completions.create(model="tiny", prompt=f"world {i}", max_tokens=48, temperature=0,
                                           extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(out) == [0, 1, 2, 3]
    assert all(r.usage.completion_tokens == 48 and r.choices[0].finish_reason == "length" for r in out.values())
    assert spy.max_batch >= 2, "the engine never decoded two requests in one step"
    assert engine.metrics().active == 0


def test_a_client_that_goes_away_cancels_its_request(served, client):
    _, engine, spy = served
    kw = dict(model="tiny", prompt="hello", max_tokens=100000, temperature=0, extra_body={"ignore_eos": True})
    stream = client.completions.create(stream=True, **kw)
    assert next(iter(stream)).choices[0].text is not None  # the first token came; now hang up
    stream.close()
    rid = spy.max_rid
    assert spy.wait_done(rid).finish_reason == "cancelled"
    # a non-streamed request whose client gives up waiting (the tiny model fills its 2048-token
    # context in about 0.85 s on a quiet machine: the client leaves well before that)
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.4).completions.create(**kw)
    assert spy.wait_done(rid + 1).finish_reason == "cancelled"
    assert engine.metrics().active == 0


def test_bad_requests_get_openai_errors(served, client):
    url, engine, _ = served
    cases = [(dict(temperature=-1), "temperature"), (dict(max_tokens=0), "max_tokens"),
             (dict(top_logprobs=3), "top_logprobs"), (dict(messages=[]), "messages"),
             (dict(stop=[1]), "stop"), (dict(n=2), "n"), (dict(logit_bias={"x": 1}), "logit_bias")]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": "tiny", "messages": ASK, **kw})
        assert e.value.status_code == 400 and e.value.body["param"] == param, (kw, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:  # the engine's own check (InvalidInputError)
        client.completions.create(model="tiny", prompt=[10 ** 9], max_tokens=2)
    assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[5] * 3000, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=ASK)
    assert e.value.body["code"] == "model_not_found"
    status, body = http("GET", url + "/v1/nowhere")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = http("POST", url + "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    engine.max_queue = 0  # the queue is full: 503, and the server goes on
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="tiny", prompt="hello", max_tokens=2)
        assert e.value.status_code == 503 and set(e.value.body) == {"message", "type", "param", "code"}
    finally:
        engine.max_queue = 1024
    assert client.completions.create(model="tiny", prompt="hello", max_tokens=2).usage.completion_tokens <= 2


def test_embeddings(served, client, tiny_model_path):
    texts = ["hello world", "the world is", "a"]
    r = client.embeddings.create(model="tiny-embed", input=texts)
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    with lb.Embedder(tiny_model_path, n_threads=2, pooling="mean") as emb:
        want = emb.embed(texts)
        n = sum(t.size for t in emb.tokenize(texts))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert r.usage.prompt_tokens == n and [d.index for d in r.data] == [0, 1, 2]
    r = client.embeddings.create(model="tiny-embed", input="hello", dimensions=8)
    assert len(r.data[0].embedding) == 8 and np.linalg.norm(r.data[0].embedding) == pytest.approx(1, abs=1e-5)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny-embed", input="hello", dimensions=10 ** 6)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="tiny", input="hello")


def test_the_example_serves_a_chat(tiny_model_path, tmp_path):
    """examples/aprender_serve.py as a user runs it, with the tiny model and as embedding model too."""
    script = Path(__file__).resolve().parent.parent / "examples" / "aprender_serve.py"
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(script), tiny_model_path, tiny_model_path],
                            env={**os.environ, "PORT": str(port)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        for _ in range(300):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            with contextlib.suppress(openai.APIConnectionError):
                names = [m.id for m in c.models.list()]
                break
            time.sleep(0.1)
        assert names == ["tiny-llama", "tiny-llama"]
        r = c.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=4, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
        assert len(c.embeddings.create(model="tiny-llama", input="hello").data[0].embedding) == 64
    finally:
        proc.terminate()
        proc.wait(30)


def test_server_benchmark_runs_against_llama_server(tiny_model_path, native_tool):
    """benchmarks/bench_server.py end to end on the tiny model: our server (python -m llamabind serve)
    and llama-server, both over HTTP, on a short trace."""
    native_tool("llama-server")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_server.py"
    out = subprocess.run([sys.executable, str(script), "--model", tiny_model_path, "--native",
                          str(native_tool("llama-server").parent), "--requests", "4", "--rate", "50", "--np", "2",
                          "--reps", "1", "--threads", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {r["impl"] for r in rows} == {"llamabind-server", "llama-server"}
    assert all(r["requests"] == 4 and r["tokens"] > 0 and r["ttft_p50"] > 0 for r in rows)


def test_a_system_message_for_chats_that_bring_none(tmp_path):
    """``create_app(system=...)`` (``serve --system``) goes in front of chats without a system message
    of their own, and nowhere else: the rendered prompt grows by it only there."""
    path = write_tiny_llama(tmp_path / "qwen3-tiny.gguf", template=(TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text())
    own = [{"role": "system", "content": "Be brief."}, *ASK]

    def prompt_tokens(system: str | None) -> tuple[int, int]:
        with lb.Model(path) as model:
            with serving(create_app(model, model_name="tiny", n_slots=1, n_ctx=512, n_threads=1,
                                    system=system)) as url:
                client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
                bare, with_own = (client.chat.completions.create(model="tiny", messages=m, max_tokens=1).usage
                                  for m in (ASK, own))
                return bare.prompt_tokens, with_own.prompt_tokens

    plain, given = prompt_tokens(None), prompt_tokens("You are a helpful assistant who answers questions.")
    assert given[0] > plain[0] and given[1] == plain[1], (plain, given)
