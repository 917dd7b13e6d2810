"""The server as a hostile client meets it, over raw HTTP on 127.0.0.1: bodies that used to be
500s are 400s in OpenAI's error shape, every bound (body size, nesting, prompt and output
tokens, grammars, schemas) answers with a 4xx, and the server still answers afterwards."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

import llamabind as lb
from conftest import TEMPLATES
from llamabind.engine import Engine
from llamabind.gbnf import GrammarLimits
from llamabind.server import Limits, create_app
from test_server import free_port, serving
from tinymodels import write_tiny_llama

CYCLE = {"allOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}
MSGS = [{"role": "user", "content": "hi"}]


def post(url: str, path: str, body: bytes | str | Any, headers: dict[str, str] | None = None,
         timeout: float = 60) -> tuple[int, Any]:
    """POST raw bytes (or JSON of an object); the status and the parsed body."""
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        c.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        raw = r.read()
    finally:
        c.close()
    return r.status, json.loads(raw) if raw else None


def is_openai_error(body: Any) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return (isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
            and isinstance(err["message"], str) and isinstance(err["type"], str))


def refused(url: str, path: str, body: Any, status: int = 400, headers: dict[str, str] | None = None) -> dict:
    got, answer = post(url, path, body, headers)
    assert got == status and is_openai_error(answer), (got, answer)
    return answer["error"]


def alive(url: str) -> None:
    got, answer = post(url, "/v1/completions", {"prompt": "hello", "max_tokens": 2, "temperature": 0,
                                                "ignore_eos": True})
    assert got == 200 and answer["usage"]["completion_tokens"] == 2, answer


LIMITS = Limits(max_body_bytes=256 << 10, max_json_depth=40, max_prompt_tokens=64, default_max_tokens=5,
                grammar=GrammarLimits(max_bytes=4096, max_rules=50, max_alternations=100))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A tiny model without a chat template (no Jinja: llama.cpp's built-in rendering), tight limits."""
    path = write_tiny_llama(tmp_path_factory.mktemp("hostile") / "plain.gguf", template=None)
    with lb.Model(path) as model:
        with serving(create_app(Engine.load(model, n_slots=2, n_ctx=512, n_threads=2), limits=LIMITS)) as url:
            yield url


@pytest.fixture(scope="module")
def jinja(tmp_path_factory):
    """A tiny model with Qwen3's Jinja template (tools, response formats through llama.cpp's chat code), tight limits."""
    path = write_tiny_llama(tmp_path_factory.mktemp("hostile") / "qwen3.gguf",
                            template=(TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text())
    with lb.Model(path) as model:
        with serving(create_app(Engine.load(model, n_slots=2, n_ctx=512, n_threads=2), limits=LIMITS)) as url:
            yield url


def test_the_old_500s_are_400s(plain):
    refused(plain, "/v1/chat/completions", "[" * 100_000 + "]" * 100_000)  # RecursionError
    refused(plain, "/v1/completions", {"prompt": "a", "top_k": 2 ** 40})  # cffi OverflowError
    for name in ("temperature", "repeat_penalty", "top_p"):  # found by fuzz_http.py: a float from a huge int
        assert refused(plain, "/v1/completions", {"prompt": "a", name: 10 ** 400})["param"] == name
    refused(plain, "/v1/completions", '{"prompt": "a", "grammar": "root ::= \\"\\ud800\\""}')  # lone surrogate
    refused(plain, "/v1/chat/completions", {"messages": MSGS, "response_format": {  # AttributeError
        "type": "json_schema", "json_schema": "not an object"}})
    refused(plain, "/v1/chat/completions", {"messages": MSGS, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}})
    for constant in ("NaN", "Infinity", "-Infinity"):
        err = refused(plain, "/v1/completions", '{"prompt": "a", "temperature": %s}' % constant)
        assert "not a JSON number" in err["message"]
    alive(plain)


def test_bounds(plain, jinja):
    assert refused(plain, "/v1/completions", {"prompt": "a" * (300 << 10)}, 413)["code"] == "request_too_large"
    deep: Any = "x"
    for _ in range(45):
        deep = [deep]
    assert "nests deeper than 40" in refused(plain, "/v1/completions", {"prompt": "a", "extra": deep})["message"]
    err = refused(plain, "/v1/completions", {"prompt": "word " * 200, "max_tokens": 1})
    assert err["code"] == "context_length_exceeded" and "more than the 64" in err["message"]
    err = refused(jinja, "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 200}]})
    assert err["code"] == "context_length_exceeded"
    got, answer = post(plain, "/v1/completions", {"prompt": "hello", "ignore_eos": True})
    assert got == 200 and answer["usage"]["completion_tokens"] == 5  # default_max_tokens
    grammar = "root ::= " + " | ".join(f'"w{i}"' for i in range(200))
    assert "alternatives" in refused(plain, "/v1/completions", {"prompt": "a", "grammar": grammar})["message"]
    assert refused(plain, "/v1/completions", {"prompt": "a", "grammar": "root ::= " + '"a" ' * 2000})["param"] == \
        "grammar"
    alive(plain)


@pytest.mark.parametrize("field", ["response_format", "json_schema", "tools"])
def test_schema_cycle_is_a_400(plain, jinja, field):
    value = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": CYCLE}},
             "json_schema": CYCLE,
             "tools": [{"type": "function", "function": {"name": "f", "parameters": CYCLE}}]}[field]
    for url in (plain, jinja) if field != "tools" else (jinja,):
        err = refused(url, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, field: value})
        assert "cycle" in err["message"] and err["param"] == field
        alive(url)


def get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("keyed") / "plain.gguf", template=None)
    with lb.Model(path) as model:
        app = create_app(Engine.load(model, n_slots=2, n_ctx=512, n_threads=2), api_keys=["k-one", "k-two"],
                         metrics=True)
        with serving(app) as url:
            yield url


def test_api_keys(keyed):
    body = {"prompt": "hello", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k-one"[:-1]},
                    {"Authorization": "Basic k-one"}, {"X-Api-Key": "k-twoo"}):
        err = refused(keyed, "/v1/completions", body, 401, headers)
        assert err == {"message": "Invalid API Key", "type": "authentication_error", "param": None,
                       "code": "invalid_api_key"}
        for path in ("/v1/models", "/metrics", "/nowhere", "/v1/models/x"):
            status, raw = get(keyed, path, headers)
            assert status == 401 and is_openai_error(json.loads(raw)), (path, status, raw)
    for headers in ({"Authorization": "Bearer k-one"}, {"Authorization": "k-two"}, {"X-Api-Key": "k-one"}):
        assert post(keyed, "/v1/completions", body, headers)[0] == 200
        assert get(keyed, "/v1/models", headers)[0] == 200
    assert get(keyed, "/health") == (200, b'{"status":"ok"}')  # public, as in llama-server
    assert get(keyed, "/v1/health")[0] == 200


def test_metrics(keyed, plain):
    auth = {"Authorization": "Bearer k-one"}
    status, raw = get(plain, "/metrics")
    assert status == 404 and "--metrics" in json.loads(raw)["error"]["message"]  # opt-in
    assert post(keyed, "/v1/completions", {"prompt": "hello", "max_tokens": 3, "ignore_eos": True}, auth)[0] == 200
    refused(keyed, "/v1/completions", {"prompt": 5}, 400, auth)
    status, raw = get(keyed, "/metrics", auth)
    text = raw.decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["llamacpp:tokens_predicted_total"] >= 3 and values["llamacpp:prompt_tokens_total"] >= 1
    for name in ("llamacpp:requests_processing", "llamacpp:requests_deferred", "llamacpp:n_decode_total",
                 "llamacpp:prompt_seconds_total", "llamabind:preempted_total", "llamabind:kv_tokens"):
        assert name in values, name
    assert values['llamabind:http_responses_total{status="400"}'] >= 1
    assert values['llamabind:requests_finished_total{reason="length"}'] >= 1
    assert "# TYPE llamacpp:prompt_tokens_total counter" in text


def test_sigterm_ends_streams_and_exits_0(gemma_path, tmp_path):
    """``serve`` as a process (keys from --api-key and --api-key-file, --metrics): on SIGTERM it
    stops listening, a stream still running past --shutdown-timeout gets a last chunk with its
    finish_reason and an error, and it exits 0."""
    port = free_port()
    (tmp_path / "keys").write_text("# the team's key\nfile-key\n\n")
    proc = subprocess.Popen([sys.executable, "-m", "llamabind", "serve", "-m", gemma_path, "--port", str(port),
                             "--slots", "2", "--ctx", "4096", "-t", "2", "--shutdown-timeout", "1.5", "--metrics",
                             "--api-key", "k1,k2", "--api-key-file", str(tmp_path / "keys")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if get(url, "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        assert get(url, "/metrics")[0] == 401
        for key in ("k1", "k2", "file-key"):
            assert get(url, "/metrics", {"Authorization": f"Bearer {key}"})[0] == 200
        assert get(url, "/v1/models", {"Authorization": "Bearer # the team's key"})[0] == 401
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("POST", "/v1/completions", body=json.dumps(
            {"prompt": "Once upon a time", "stream": True, "max_tokens": 3000, "ignore_eos": True}),
                  headers={"Content-Type": "application/json", "Authorization": "Bearer file-key"})
        r = c.getresponse()
        assert r.status == 200
        first = r.readline()
        assert first.startswith(b"data: "), first
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        lines = [first] + [line for line in iter(r.readline, b"")]  # until the server ends the response
        took = time.monotonic() - t0
        events = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
        assert 1.0 < took < 10, took
        assert events[-2]["choices"][0]["finish_reason"] == "length", events[-2:]
        assert is_openai_error(events[-1]) and "shutting down" in events[-1]["error"]["message"], events[-1]
        assert proc.wait(30) == 0, proc.stderr.read()
        with pytest.raises(OSError):  # nobody listens any more
            get(url, "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
