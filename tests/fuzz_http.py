"""A fuzzer for the server's HTTP surface: hypothesis strategies for OpenAI request bodies, sent
over raw HTTP to a running ``python -m llamabind serve`` on 127.0.0.1.

Bodies come in classes (each example names its own; the run counts them): valid chat and text
completions (streamed or not, with tools, schemas, logprobs, stops, grammars), nearly valid ones
(one field given a wrong type, a value out of range, an unknown field), and hostile ones: raw
bytes that are no JSON or no UTF-8, deep nesting, ``NaN``, lone surrogates, huge numbers and
strings, schemas with ``$ref`` cycles and ``type`` lists, ambiguous and malformed grammars, wrong
methods and paths. The property: every answer is 2xx, or 4xx in OpenAI's error shape; never
5xx; the server stays alive and still answers a known greedy request with the same text.

    python tests/fuzz_http.py --examples 2000 --seed 1          # starts a server on the tiny model
    python tests/fuzz_http.py --examples 500 --plain            # a model without a chat template
    python tests/fuzz_http.py --url http://127.0.0.1:8080 ...   # a server already running

It prints one JSON line of totals: bodies sent, by class and status, 5xx, deaths (a server that
stopped answering), and the findings (a body that broke the property, the first few).
tests/test_fuzz_http.py runs a bounded number in CI (``LLAMABIND_FUZZ_HTTP_EXAMPLES``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: E402
from hypothesis import seed as hyp_seed  # noqa: E402

KNOWN = {"prompt": "hello world", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
MSGS = [{"role": "user", "content": "hi"}]
CYCLE = {"allOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}
TREE = {"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {
    "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}, "maxItems": 2}},
    "required": ["v"]}}}
AMBIGUOUS = "root ::= " + "(" * 12 + "[a-z ]*" + ")*" * 12
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# -- strategies ----------------------------------------------------------------------------------
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
weird_text = st.one_of(text, st.text(max_size=20).map(lambda s: s + "\ud800"),  # a lone surrogate
                       st.sampled_from(["", "\0", "\u202e", "𝕏" * 50, "<|im_start|>", "{{ x }}", "\\u0000"]))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False,
                        allow_infinity=False), text)
any_json = st.recursive(json_scalar, lambda c: st.one_of(st.lists(c, max_size=4),
                                                          st.dictionaries(text, c, max_size=4)), max_leaves=12)
schemas = st.one_of(
    st.just({"type": "object"}), st.just(TREE), st.just(CYCLE),
    st.just({"type": "object", "properties": {"a": {"type": "string", "pattern": "^" + "(" * 90 + "a" + ")" * 90 + "$"}}}),
    st.integers(1, 9).map(lambda n: {"type": ["object"] * n, "properties": {"a": {"type": ["object"] * n, "properties": {
        "b": {"type": ["string", "integer"]}}}}}),
    st.just({"$ref": "#/nowhere"}), st.just({"$ref": "http://example.com/x"}), st.just({"$ref": "#"}),
    st.just({"type": "array", "minItems": 2 ** 31, "items": {"type": "integer"}}),
    st.just({"type": "integer", "minimum": 1e300}), st.just({"enum": []}), any_json)
grammars = st.one_of(
    st.just('root ::= "yes" | "no"'), st.just(AMBIGUOUS), st.just("root ::= root"), st.just("root ::= [a-z]{5000}"),
    st.just("root ::= " + "(" * 3000 + '"a"' + ")" * 3000), st.just("x ::= y"), text.map(lambda t: "root ::= " + t),
    st.just('root ::= "\\ud800"'), st.just("root ::= <[999999999]>"), weird_text)


def sampling() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={
        "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "top_k": st.integers(0, 100),
        "min_p": st.floats(0, 1), "seed": st.integers(-2 ** 40, 2 ** 40), "stop": st.one_of(text, st.lists(text, max_size=3)),
        "frequency_penalty": st.floats(-2, 2), "presence_penalty": st.floats(-2, 2),
        "repeat_penalty": st.floats(0.5, 2), "logit_bias": st.dictionaries(st.integers(0, 300).map(str),
                                                                            st.floats(-100, 100), max_size=3),
        "ignore_eos": st.booleans(), "n": st.just(1)})


@st.composite
def valid(draw: Any) -> tuple[str, str, dict[str, Any]]:
    body = draw(sampling())
    body["max_tokens"] = draw(st.integers(1, 6))
    stream = draw(st.booleans())
    if stream:
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": True}
    if draw(st.booleans()):
        body["prompt"] = draw(st.one_of(text.filter(bool), st.lists(st.integers(0, 255), min_size=1, max_size=8)))
        if draw(st.booleans()):
            body["logprobs"] = draw(st.integers(0, 5))
        return "valid completion", "/v1/completions", body
    body["messages"] = draw(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                            "content": text}), min_size=1, max_size=3))
    extra = draw(st.sampled_from(["", "schema", "json_object", "tools", "logprobs", "grammar"]))
    if extra == "schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": draw(schemas)}}
    elif extra == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif extra == "tools":
        body["tools"] = TOOLS
    elif extra == "logprobs":
        body.update(logprobs=True, top_logprobs=draw(st.integers(0, 5)))
    elif extra == "grammar":
        body["grammar"] = 'root ::= "yes" | "no"'
    return "valid chat" + (f" {extra}" if extra else ""), "/v1/chat/completions", body


BAD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 80, 2 ** 80), st.floats(allow_nan=False), text,
                       st.lists(json_scalar, max_size=3), st.dictionaries(text, json_scalar, max_size=3))
FIELDS = ["max_tokens", "max_completion_tokens", "n_predict", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
          "stream", "stream_options", "logprobs", "top_logprobs", "logit_bias", "messages", "prompt", "model", "n",
          "tools", "tool_choice", "response_format", "json_schema", "grammar", "echo", "suffix", "best_of",
          "chat_template_kwargs", "reasoning_format", "enable_thinking", "parallel_tool_calls", "ignore_eos",
          "frequency_penalty", "presence_penalty", "repeat_penalty", "dimensions", "encoding_format", "input"]


@st.composite
def nearly_valid(draw: Any) -> tuple[str, str, dict[str, Any]]:
    _, path, body = draw(valid())
    name = draw(st.sampled_from(FIELDS + ["unknown_field"]))
    how = draw(st.sampled_from(["value", "drop"]))
    if how == "drop":
        body.pop(draw(st.sampled_from(sorted(body))), None)
    else:
        body[name] = draw(st.one_of(BAD_VALUES, schemas, grammars) if name in ("response_format", "json_schema",
                                                                                 "grammar") else BAD_VALUES)
        if name == "response_format" and draw(st.booleans()):
            body[name] = {"type": "json_schema", "json_schema": draw(BAD_VALUES)}
    path = draw(st.sampled_from([path, path, "/v1/embeddings"]))
    return f"nearly valid {how} {name if how == 'value' else ''}".strip(), path, body


def nested(n: int, kind: str) -> bytes:
    return (("[" * n + "]" * n) if kind == "list" else ('{"a":' * n + "1" + "}" * n)).encode()


@st.composite
def hostile(draw: Any) -> tuple[str, str, bytes | dict[str, Any]]:
    kind = draw(st.sampled_from(["nesting", "constant", "surrogate", "not json", "not utf-8", "huge number", "big body",
                                 "schema", "grammar", "tool schema", "unicode", "not an object", "deep field"]))
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]))
    if kind == "nesting":
        return kind, path, nested(draw(st.sampled_from([200, 1000, 100_000])), draw(st.sampled_from(["list", "dict"])))
    if kind == "constant":
        c = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0", "1E400"]))
        return kind, path, ('{"prompt": "a", "max_tokens": 2, "temperature": %s, "messages": [{"role": "user", '
                            '"content": "x"}]}' % c).encode()
    if kind == "surrogate":
        field = draw(st.sampled_from(["prompt", "grammar", "stop", "content", "model"]))
        v = '"a\\ud800"' if field != "content" else '[{"role": "user", "content": "\\udfff"}]'
        name = "messages" if field == "content" else field
        return kind, path, ('{"prompt": "a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "%s": %s}'
                            % (name, v)).encode()
    if kind == "not json":
        return kind, path, draw(st.sampled_from([b"", b"{", b"null", b"[]", b"\"x\"", b"{'a': 1}", b"{\"a\":1}{}",
                                                 b"\x00\x01", b"1" * 5000]))
    if kind == "not utf-8":
        return kind, path, b'{"prompt": "\xff\xfe", "max_tokens": 2}'
    if kind == "huge number":
        field = draw(st.sampled_from(["top_k", "max_tokens", "seed", "n", "top_logprobs", "logprobs", "dimensions",
                                      "n_predict", "temperature"]))
        v = draw(st.sampled_from([2 ** 31, 2 ** 32, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 400]))
        return kind, path, {"prompt": "a", "messages": MSGS, "input": "a", "max_tokens": 2, field: v}
    if kind == "big body":
        return kind, path, {"prompt": "a " * draw(st.sampled_from([10_000, 200_000, 3_000_000])), "max_tokens": 1}
    if kind in ("schema", "tool schema"):
        s = draw(schemas)
        if kind == "tool schema":
            return kind, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, "tools": [
                {"type": "function", "function": {"name": "f", "parameters": s}}]}
        return kind, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, draw(st.sampled_from(
            ["json_schema", "response_format"])): s if draw(st.booleans()) else {"type": "json_schema",
                                                                                "json_schema": {"schema": s}}}
    if kind == "grammar":
        return kind, path, {"prompt": "a", "messages": MSGS, "max_tokens": 3, "grammar": draw(grammars)}
    if kind == "unicode":
        return kind, path, {"prompt": draw(weird_text), "messages": [{"role": draw(weird_text), "content": draw(weird_text)}],
                            "stop": [draw(weird_text)], "max_tokens": 2, "model": draw(weird_text)}
    if kind == "not an object":
        return kind, path, draw(st.one_of(st.lists(json_scalar, max_size=3), json_scalar))
    deep: Any = "x"
    for _ in range(draw(st.integers(20, 300))):
        deep = {"a": deep} if draw(st.booleans()) else [deep]
    return kind, path, {"prompt": "a", "messages": MSGS, "max_tokens": 2, draw(st.sampled_from(FIELDS)): deep}


@st.composite
def odd_request(draw: Any) -> tuple[str, str, str, bytes]:
    method = draw(st.sampled_from(["GET", "PUT", "DELETE", "POST"]))
    path = draw(st.sampled_from(["/v1/models", "/v1/models/x", "/v1/models/" + "a" * 3000, "/health", "/nowhere",
                                 "/v1/chat/completions", "/metrics", "/v1/../health", "/%ff"]))
    return "method/path", method, path, draw(st.sampled_from([b"", b"{}"]))


bodies = st.one_of(valid(), nearly_valid(), hostile())


# -- the server and the checks --------------------------------------------------------------------
def send(port: int, method: str, path: str, body: bytes | Any, timeout: float = 120) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8", "surrogatepass")
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def openai_error(raw: bytes) -> bool:
    try:
        err = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err)


def problem(status: int, raw: bytes) -> str | None:
    """What breaks the property in one answer, or None."""
    if status >= 500:
        return f"{status}: {raw[:300]!r}"
    if 400 <= status < 500 and status != 499 and not openai_error(raw):
        return f"{status} not in OpenAI's error shape: {raw[:300]!r}"
    if 200 <= status < 300 and raw.startswith(b"data: "):
        events = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
        if events[-1] != b"[DONE]" and not openai_error(events[-1]):
            return f"a stream that ends without [DONE] or an error: {raw[-300:]!r}"
        for e in events[:-1]:
            if b'"error"' in e[:12]:
                return f"an error in the middle of a stream: {e[:300]!r}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(model: str, extra: list[str] = ()) -> Iterator[tuple[int, subprocess.Popen]]:  # type: ignore[assignment]
    """``python -m llamabind serve`` on ``model``, on 127.0.0.1, small bounds so examples stay fast."""
    port = free_port()
    cmd = [sys.executable, "-m", "llamabind", "serve", "-m", model, "--port", str(port), "--slots", "2", "--ctx", "2048",
           "-t", "2", "--max-body-bytes", str(1 << 20), "--default-max-tokens", "8", "--shutdown-timeout", "1",
           *extra]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the server exited with {proc.returncode}: {log.read()[-2000:]!r}")
            with contextlib.suppress(OSError):
                if send(port, "GET", "/health", b"", 5)[0] == 200:
                    break
            time.sleep(0.1)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Run:
    """Totals over one fuzzing run."""

    def __init__(self, port: int, proc: subprocess.Popen | None, check_every: int = 25) -> None:
        self.port, self.proc, self.check_every = port, proc, check_every
        self.sent = 0
        self.classes: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.n5xx = self.deaths = 0
        self.findings: list[str] = []
        self.known = self._known()

    def _known(self) -> str:
        status, raw = send(self.port, "POST", "/v1/completions", KNOWN)
        assert status == 200, (status, raw)
        return json.loads(raw)["choices"][0]["text"]

    def alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            return False
        try:
            return self._known() == self.known
        except (OSError, AssertionError, ValueError, KeyError):
            return False

    def one(self, cls: str, method: str, path: str, body: bytes | Any) -> None:
        self.sent += 1
        self.classes[cls] += 1
        try:
            status, raw = send(self.port, method, path, body)
        except (OSError, http.client.HTTPException) as e:
            status, raw = 0, repr(e).encode()
        self.statuses[status] += 1
        self.n5xx += status >= 500
        bad = problem(status, raw) if status else f"no answer: {raw!r}"
        if bad is not None and status == 0 and self.alive():
            bad = None  # the connection failed, not the server (a body refused before it was read)
        if bad is None and self.sent % self.check_every == 0 and not self.alive():
            bad = "the server no longer answers the known request correctly"
        if bad is not None:
            self.findings.append(f"[{cls}] {method} {path} {str(body)[:300]}: {bad}")
            if not self.alive():
                self.deaths += 1
                raise AssertionError(f"the server died: {self.findings[-1]}")
            raise AssertionError(self.findings[-1])

    def totals(self) -> dict[str, Any]:
        return {"bodies": self.sent, "classes": dict(sorted(self.classes.items())),
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())}, "5xx": self.n5xx,
                "deaths": self.deaths, "findings": self.findings[:5]}


def fuzz(run: Run, examples: int, seed: int | None = None, hostile_only: bool = False) -> None:
    """Send ``examples`` bodies (and odd methods and paths); AssertionError at the first finding."""
    chosen = hostile() if hostile_only else bodies

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.one_of(chosen.map(lambda x: (x[0], "POST", x[1], x[2])), odd_request()))
    def body(case: tuple[str, str, str, Any]) -> None:
        run.one(*case)

    if seed is not None:
        body = hyp_seed(seed)(body)
    body()
    if not run.alive():
        run.deaths += 1
        raise AssertionError("the server died at the end of the run")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--url", help="a server already running on 127.0.0.1 (else one is started on the tiny model)")
    ap.add_argument("--model", help="the GGUF to serve (default: the tiny random llama, Qwen3's template)")
    ap.add_argument("--plain", action="store_true", help="the tiny model without a chat template")
    ap.add_argument("--hostile", action="store_true", help="hostile bodies only (and odd methods and paths)")
    args = ap.parse_args()
    if args.url:
        run = Run(int(args.url.rsplit(":", 1)[1].rstrip("/")), None)
        try:
            fuzz(run, args.examples, args.seed, args.hostile)
        finally:
            print(json.dumps(run.totals()))
        return 0 if not run.findings else 1
    with tempfile.TemporaryDirectory() as d:
        model = args.model or tiny_model(Path(d), args.plain)
        with server(model) as (port, proc):
            run = Run(port, proc)
            try:
                fuzz(run, args.examples, args.seed, args.hostile)
            finally:
                print(json.dumps(run.totals()), flush=True)
    return 0 if not run.findings else 1


def tiny_model(d: Path, plain: bool) -> str:
    from conftest import TEMPLATES
    from tinymodels import write_tiny_llama

    template = None if plain else (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text()
    return write_tiny_llama(d / "fuzz.gguf", template=template)


if __name__ == "__main__":
    sys.exit(main())
