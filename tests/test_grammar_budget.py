"""llamabind's patch to llama.cpp's grammar (vendor/patches/llama-grammar-work-budget.patch): the
work one token of a grammar may cost is bounded (LLAMA_GRAMMAR_MAX_WORK), so an ambiguous grammar
fails its own request in well under a second instead of holding the engine's thread for tens of
seconds a token (28 s on gemma3-270m for twelve ``[a-z ]*`` in a row, unpatched, loaded machine);
ordinary grammars (JSON in the middle of a string: the costliest state measured, about 5 million
units) are far inside the default of 50 million."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import llamabind as lb
from llamabind.chat import json_schema_to_grammar
from llamabind.engine import Engine, EngineThread
from llamabind.sampler import TOKEN_DATA

SEQ12 = "root ::= " + " ".join(["[a-z ]*"] * 12)
# a literal longer than any token first: applying it to the vocabulary is cheap, the ambiguity comes later
LATE = 'root ::= "the quick brown fox jumps over the lazy dog" ' + " ".join(["[a-z ]*"] * 12)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def apply_all(sampler: lb.Sampler, n_vocab: int) -> None:
    cand = np.zeros(n_vocab, dtype=TOKEN_DATA)
    cand["id"] = np.arange(n_vocab)
    sampler.apply(cand)


def test_an_ambiguous_grammar_fails_fast(gemma_model):
    v = gemma_model.vocab
    s = lb.Sampler.grammar(v, SEQ12)
    t = time.perf_counter()
    with pytest.raises(lb.InvalidInputError, match="needs more than 50000000 steps for one token"):
        apply_all(s, v.n_tokens)
    assert time.perf_counter() - t < 10  # unpatched: 28 s here
    s.close()


def test_json_in_a_string_is_far_inside_the_budget(gemma_model):
    v = gemma_model.vocab
    s = lb.Sampler.grammar(v, json_schema_to_grammar(SCHEMA))
    for tok in v.tokenize('{"name": "ab', add_special=False):
        s.accept(int(tok))
    apply_all(s, v.n_tokens)
    s.close()


def test_the_budget_comes_from_the_environment(gemma_path):
    code = f"""
import numpy as np, llamabind as lb
from llamabind.sampler import TOKEN_DATA
with lb.Model({gemma_path!r}) as m:
    s = lb.Sampler.grammar(m.vocab, 'root ::= [a-z ]*')
    cand = np.zeros(m.vocab.n_tokens, dtype=TOKEN_DATA); cand["id"] = np.arange(m.vocab.n_tokens)
    try:
        s.apply(cand)
        print("applied")
    except lb.InvalidInputError as e:
        print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LLAMA_GRAMMAR_MAX_WORK": "1000"}).stdout
    assert "needs more than 1000 steps" in out, out


def test_the_engine_ends_only_that_request(gemma_model):
    """The grammar turns ambiguous after its literal: that request ends with the error, its text so
    far kept; a request beside it runs to its end."""
    with EngineThread(Engine.load(gemma_model, n_slots=2, n_ctx=1024, n_threads=2)) as et:
        bad = et.submit(prompt="Say it:", grammar=LATE, max_tokens=64)
        good = et.submit(prompt="Once upon a time", max_tokens=24, ignore_eog=True)
        done = bad.result()
        assert done.finish_reason == "error" and "steps for one token" in str(done.error)
        assert "the quick brown fox" in done.text  # what it had made before the grammar got stuck
        ok = good.result()
        assert ok.finish_reason == "length" and ok.usage.completion_tokens == 24


def test_the_server_refuses_it_before_the_engine(gemma_model):
    """The server applies a client's grammar once on a worker thread first: too ambiguous is a 400."""
    from llamabind.server import create_app
    from test_server import serving
    from test_server_hostile import is_openai_error, post

    app = create_app(Engine.load(gemma_model, n_slots=2, n_ctx=1024, n_threads=2), api_keys=["k1", "k2"])
    with serving(app) as url:
        t = time.perf_counter()
        status, body = post(url, "/v1/completions", {"prompt": "a", "max_tokens": 4, "grammar": SEQ12},
                            {"Authorization": "Bearer k1"})
        assert status == 400 and is_openai_error(body) and body["error"]["param"] == "grammar", body
        assert "steps for one token" in body["error"]["message"] and time.perf_counter() - t < 10
        status, body = post(url, "/v1/completions", {"prompt": "a", "max_tokens": 4, "grammar": 'root ::= "yes"'},
                            {"Authorization": "Bearer k1"})
        assert status == 429, body  # that client is in the penalty box for a while
        status, body = post(url, "/v1/completions", {"prompt": "a", "max_tokens": 4, "grammar": 'root ::= "yes"'},
                            {"Authorization": "Bearer k2"})
        assert status == 200 and body["choices"][0]["text"] == "yes", body
        status, body = post(url, "/v1/completions", {"prompt": "a", "max_tokens": 4, "grammar": "root ::= nope"},
                            {"Authorization": "Bearer k2"})
        assert status == 400 and "grammar" in body["error"]["message"].lower(), body


def test_a_client_past_the_budget_waits(gemma_model):
    """A grammar that passes the server's probe and fails in the engine (ambiguous after a literal)
    costs the engine's thread one budget of work; its client's grammars then get 429 for a while."""
    from llamabind.server import Limits, create_app
    from test_server import serving
    from test_server_hostile import post

    app = create_app(Engine.load(gemma_model, n_slots=2, n_ctx=1024, n_threads=2), api_keys=["a", "b"],
                     limits=Limits(grammar_penalty_s=30))
    yes = {"prompt": "a", "max_tokens": 4, "grammar": 'root ::= "yes"'}
    with serving(app) as url:
        a, b = {"Authorization": "Bearer a"}, {"Authorization": "Bearer b"}
        status, body = post(url, "/v1/completions", {"prompt": "Say:", "max_tokens": 40, "grammar": LATE}, a)
        assert status == 400 and "LLAMA_GRAMMAR_MAX_WORK" in body["error"]["message"], body
        status, body = post(url, "/v1/completions", yes, a)
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded", body
        assert post(url, "/v1/completions", yes, b)[0] == 200  # another client
        assert post(url, "/v1/completions", {"prompt": "a", "max_tokens": 2}, a)[0] == 200  # no grammar: fine
