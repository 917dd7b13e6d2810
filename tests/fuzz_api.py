"""A stateful attack harness for llamabind's public API (hypothesis RuleBasedStateMachine).

Random sequences of calls on models, vocabularies, contexts, memory, batches, samplers,
generations, embedders and numpy views, with valid and hostile arguments, and threads
closing handles while a decode runs. A call may raise a llamabind error (LlamaError) or
ValueError/TypeError; any other exception is a finding, and a crash (SIGSEGV, SIGABRT) kills
the process, so run this in a subprocess (tests/test_fuzz_api.py does).

Every call is Python code executed in one namespace per example, and written (flushed) to
the log *before* it runs, as a doctest-like session (``>>> `` / ``... ``). After a crash the
last example of the log is a reproducer::

    python tests/fuzz_api.py --examples 50 --steps 40 --seed 1 --log /tmp/fuzz.log
    python tests/fuzz_api.py --replay /tmp/fuzz.log         # re-run the log's last example

``--avoid TAG,TAG`` skips the hostile calls of known crash classes (the tags are printed
with each finding and listed by ``--list-tags``); ``--keep-going`` records findings instead
of stopping at the first one.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from hypothesis import HealthCheck, Phase, settings, strategies as st  # noqa: E402
from hypothesis import seed as hyp_seed  # noqa: E402
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, multiple, rule, run_state_machine_as_test  # noqa: E402

import llamabind as lb  # noqa: E402
from llamabind.errors import LlamaError  # noqa: E402

ALLOWED = (LlamaError, ValueError, TypeError)

# Hostile calls, by tag (a crash class). --avoid skips them.
TAGS = {
    "vocab_oor": "Vocab.is_control/is_eog/text/token_to_piece/detokenize with out-of-range ids",
    "sample_noselect": "Sampler.sample with a chain that never selects a token (top_k only, Python edit-only)",
    "accept_bad": "Sampler.accept of out-of-range / end-of-generation / grammar-rejected tokens",
    "apply_bad": "Sampler.apply on candidate arrays with out-of-range ids, empty, NaN",
    "mem_all": "Memory.seq_add/seq_div with seq_id -1",
    "mem_odd": "Memory ops with out-of-range ranges, p0 > p1, negative deltas",
    "embd_seq_n": "Context.embeddings_seq(seq, n) with n larger than the embedding",
    "view_after": "reading numpy views of logits/embeddings after close() or a later decode",
    "gen_after": "generate_after on a sequence with no outputs / odd n_past",
    "gen_odd": "generate/complete/generate_many with odd arguments",
    "batch_poke": "writing Batch arrays / n_tokens directly (over capacity, bad seq ids)",
    "ctx_odd": "Context with hostile parameters (threads, pooling, tiny sizes)",
    "encode_big": "encode / non-causal decode of more tokens than n_ubatch",
    "lora_temp": "set_loras with a temporary adapter, then decode",
    "close_thread": "closing the Context or Model from another thread during a decode",
    "state_garbage": "state_load / seq_state_load / state_load_file with garbage",
    "pooled_rank": "rank pooling on a model without a classifier head",
    "py_sampler": "Python samplers that raise, edit logits only, or write bad ids",
    "int_overflow": "Python ints beyond int32 passed where llama.cpp takes int32",
    "embedder": "Embedder on the tiny model with odd arguments",
    "sampler_after_model": "a grammar/infill/dry sampler used after its model was closed",
    "py_reentrant": "a Python sampler that closes its chain, context or model, or decodes, from inside apply",
    "clone_grammar": "accepting tokens into a clone of a grammar sampler",
    "noncausal_gen": "generate/complete on a context switched to non-causal attention (set_causal_attn(False))",
    "sampler_thread": "closing a sampler from another thread while it samples; one sampler shared by two threads",
    "vocab_only": "a Context over a Model loaded with vocab_only=True (no weights), then decoding",
    "py_keep_cur": "a Python sampler keeping the TokenDataArray it was given and using it after apply returned",
    "grammar_deep": "a GBNF grammar nested tens of thousands of parentheses deep",
    "batch_dtype": "re-typing a Batch array in place (arr.dtype = ...) so the checks and C see different values",
    "chat": "apply_chat_template with odd messages / templates",
    "sampler_odd": "Sampler constructors with hostile parameters",
    "gate_thread": "memory, state, setters, sampling, decode and close from a second thread while a decode runs",
    "gate_reenter": "the same calls from inside the context's abort callback or a Python sampler",
    "gate_steps": "the same calls between two steps of a generation, in its own thread",
    "gate_engine": "the same calls while an EngineThread drives the context, with an abort callback that raises",
}

# Executed at the start of every example (and of --replay): helpers the logged code uses.
PREAMBLE = r'''
import gc, threading, time
import numpy as np
import llamabind as lb
from llamabind.sampler import TOKEN_DATA

class Boom(Exception):
    """Raised on purpose by the fuzzer's own callbacks; llamabind may pass it on."""

def boom(*args):
    raise Boom("boom")

class PyRaise(lb.PySampler):
    name = "py-raise"
    def apply(self, cur): raise Boom("apply boom")
    def accept(self, tok): raise Boom("accept boom")

class PyEdit(lb.PySampler):
    name = "py-edit"
    def apply(self, cur): cur.data["logit"] *= 0.5

class PySelect(lb.PySampler):
    name = "py-select"
    def apply(self, cur): cur.selected = int(np.argmax(cur.data["logit"]))

class PyTruncate(lb.PySampler):
    name = "py-truncate"
    def apply(self, cur):
        cur.truncate(1)
        cur.selected = 0

class PyBadIds(lb.PySampler):
    name = "py-bad-ids"
    def apply(self, cur):
        cur.data["id"][:] = 10**6
        cur.selected = 0

class PyBadSelect(lb.PySampler):
    name = "py-bad-select"
    def apply(self, cur): cur.selected = 10**6

class PyCloser(lb.PySampler):
    """Closes ``victim`` (or calls it, if callable) from inside apply, then selects a token."""
    name = "py-closer"
    victim = None
    def apply(self, cur):
        v = self.victim
        if callable(v):
            v()
        elif v is not None:
            v.close()
        cur.selected = 0

def closer_chain(victim_of, *more):
    """A chain whose first sampler closes victim_of(chain) while the chain runs."""
    p = PyCloser()
    ch = lb.Sampler.chain(p.as_sampler(), *more, lb.Sampler.greedy())
    p.victim = victim_of(ch)
    return ch

class PyKeep(lb.PySampler):
    """Keeps the candidates it was given (the fuzzer uses them after apply returned)."""
    name = "py-keep"
    cur = None
    def apply(self, cur):
        PyKeep.cur = cur
        cur.selected = 0

def use_kept():
    cur = PyKeep.cur
    if cur is not None:
        _ = [bytearray(4000) for _ in range(2000)]
        cur.data["logit"][:] = 1.0
        cur.selected = 0
        cur.sorted = True
        return float(cur.data["logit"].sum())

def cands(ids, logits=None):
    a = np.zeros(len(ids), dtype=TOKEN_DATA)
    a["id"] = ids
    a["logit"] = np.linspace(1.0, -1.0, len(ids)) if logits is None else logits
    return a

def touch(v):
    """Read a numpy view (first, last element and the sum)."""
    if v.size:
        return float(v[0]) + float(v[-1]) + float(np.sum(v))
    return 0.0

def fresh_batch(ctx, n, seq=0, logits="all"):
    """A valid batch of n tokens continuing sequence ``seq`` of ctx."""
    b = lb.Batch(max(n, 1))
    b.add(np.arange(n) % (ctx.n_vocab - 3) + 3, ctx.memory.seq_pos_max(seq) + 1, seq, logits)
    return b

OK_ERRORS = (lb.LlamaError, ValueError, TypeError, Boom)

def decode_in_threads(ctx, n, k):
    """k threads decoding into distinct sequences of one context at once."""
    errors = []
    def work(s):
        try:
            ctx.decode(fresh_batch(ctx, n, s % ctx.n_seq_max))
        except BaseException as e:
            errors.append(e)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(k)]
    for t in ts: t.start()
    for t in ts: t.join(60)
    for e in errors:
        if not isinstance(e, OK_ERRORS):
            raise e

class PySlow(lb.PySampler):
    name = "py-slow"
    def apply(self, cur): time.sleep(0.02)

def close_sampler_while_sampling(ctx, sampler_expr_fn, delay):
    """Sample in a thread with a slow chain; close the chain from this thread meanwhile."""
    ch = lb.Sampler.chain(PySlow().as_sampler(), *sampler_expr_fn(), lb.Sampler.greedy())
    ctx.decode(fresh_batch(ctx, 2))
    errors = []
    def work():
        try:
            ch.sample(ctx)
        except BaseException as e:
            errors.append(e)
    t = threading.Thread(target=work)
    t.start()
    time.sleep(delay)
    ch.close()
    t.join(60)
    for e in errors:
        if not isinstance(e, OK_ERRORS):
            raise e

def share_sampler(model, sampler, n_threads, rounds):
    """One sampler driving generations on n_threads contexts at once."""
    ctxs = [lb.Context(model, n_ctx=128, n_batch=32, n_threads=1) for _ in range(n_threads)]
    errors = []
    def work(c):
        for _ in range(rounds):
            try:
                lb.complete(c, "hello", max_tokens=12, sampler=sampler, reuse_cache=False)
            except BaseException as e:
                errors.append(e)
    ts = [threading.Thread(target=work, args=(c,)) for c in ctxs]
    for t in ts: t.start()
    for t in ts: t.join(120)
    for c in ctxs: c.close()
    for e in errors:
        if not isinstance(e, OK_ERRORS):
            raise e
    return [repr(e) for e in errors]

MUTATIONS = {
    "causal": lambda c: c.set_causal_attn(False),
    "seq_rm": lambda c: c.memory.seq_rm(0),
    "seq_cp": lambda c: c.memory.seq_cp(0, c.n_seq_max - 1),
    "clear": lambda c: c.memory.clear(),
    "state": lambda c: c.state_save(),
    "threads": lambda c: c.set_threads(1),
    "decode": lambda c: c.decode(fresh_batch(c, 2)),
    "logits": lambda c: c.logits(-1),
    "sample": lambda c: lb.Sampler.chain(lb.Sampler.top_k(3), lb.Sampler.dist(1)).sample(c),
    "close": lambda c: c.close(),
    "model_close": lambda c: c.model.close(),
}

def mutate_during_decode(ctx, op, delay, n=16):
    """Decode n tokens in a thread (slowed by an abort callback); ``op`` (closing the context or its
    model among them) from this thread meanwhile."""
    errors = []
    b = fresh_batch(ctx, n)
    ctx.set_abort_callback(lambda: time.sleep(0.0002) or False)
    def work():
        try:
            ctx.decode(b)
        except BaseException as e:
            errors.append(e)
    t = threading.Thread(target=work)
    t.start()
    time.sleep(delay)
    try:
        MUTATIONS[op](ctx)
    except OK_ERRORS:
        pass
    t.join(60)
    assert not t.is_alive(), "decode thread hung"
    for e in errors:
        if not isinstance(e, OK_ERRORS):
            raise e

def reenter_from_callback(ctx, op, where):
    """``op`` from inside a callback that llama.cpp runs on the context (abort callback, Python sampler)."""
    try:
        if where == "abort":
            ctx.set_abort_callback(lambda: MUTATIONS[op](ctx) or False)
            ctx.decode(fresh_batch(ctx, 2))
        else:
            class Reenter(lb.PySampler):
                def apply(self, cur): MUTATIONS[op](ctx)
            ctx.decode(fresh_batch(ctx, 2))
            lb.Sampler.chain(Reenter().as_sampler(), lb.Sampler.greedy()).sample(ctx)
    finally:
        if not ctx.closed:
            ctx.set_abort_callback(None)

def mutate_between_steps(ctx, op, k):
    """``op`` between two steps of a generation, in the generation's own thread."""
    g = lb.generate_many(ctx, ["hello", "world"], max_tokens=8)
    for _ in range(k):
        next(g, None)
    try:
        MUTATIONS[op](ctx)
    except OK_ERRORS:
        pass
    return [type(ev).__name__ for ev in g]

def engine_under_fire(ctx, op, delay, raising_abort):
    """An EngineThread on ``ctx`` with two requests; ``op`` from this thread meanwhile; an abort
    callback that raises once. Every request must end (a DoneEvent), whatever happens."""
    if raising_abort:
        calls = []
        def cb():
            calls.append(1)
            if len(calls) == 2:
                raise Boom("abort callback")
            return False
        ctx.set_abort_callback(cb)
    eng = lb.Engine(ctx)
    with lb.EngineThread(eng) as et:
        hs = [et.submit(prompt=p, max_tokens=12) for p in ("hello there", "x " * 20)]
        time.sleep(delay)
        try:
            MUTATIONS[op](ctx)
        except OK_ERRORS:
            pass
        ends = [h.result().finish_reason for h in hs]
    return ends

def getters_while_closing(model, delay):
    """Model and vocab getters in a thread while this thread closes the model."""
    v = model.vocab
    def work():
        try:
            while True:
                model.metadata; model.n_embd; model.description; v.is_eog(1); v.eos; v.tokenize("ab cd")
        except lb.ClosedError:
            pass
    t = threading.Thread(target=work)
    t.start()
    time.sleep(delay)
    model.close()
    t.join(60)
    assert not t.is_alive(), "getter thread hung"

def abort_during_generate(ctx, prompt, delay):
    c = lb.Cancel()
    threading.Timer(delay, c.set).start()
    return lb.complete(ctx, prompt, max_tokens=32, cancel=c)
'''


# the names of the preamble's MUTATIONS, for the rules that pick one
MUTATION_OPS = tuple(sorted(re.findall(r'^    "(\w+)": lambda c:', PREAMBLE, re.M)))


class Finding(Exception):
    """An exception outside LlamaError/ValueError/TypeError."""


class G:
    """Run-wide state."""

    log = None
    examples = 0
    calls = 0
    avoid: set[str] = set()
    keep_going = False
    findings: dict[tuple, str] = {}
    models: list[str] = []
    lora: str | None = None
    tmpdir: str = ""


def log(text: str) -> None:
    if G.log is not None:
        G.log.write(text + "\n")
        G.log.flush()


def _entry(code: str, tag: str | None = None) -> str:
    lines = code.strip("\n").split("\n")
    first = ">>> " + lines[0] + (f"   # [{tag}]" if tag else "")
    return "\n".join([first] + ["... " + ln for ln in lines[1:]])


def execute(ns: dict, code: str, tag: str | None = None, allowed: tuple = ALLOWED) -> bool:
    """Log ``code`` then run it in ``ns``; True if it ran without an (allowed) exception."""
    if tag is not None and tag in G.avoid:
        return False
    log(_entry(code, tag))
    G.calls += 1
    try:
        exec(compile(code, "<fuzz>", "exec"), ns)
        return True
    except allowed as e:
        log(f"# -> {type(e).__name__}: {str(e)[:160]}".replace("\n", " "))
        return False
    except Exception as e:  # a finding
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        log(f"# !! FINDING {type(e).__name__}: {detail[:300]}")
        key = (type(e).__name__, tag, _first_call(code))
        if key not in G.findings:
            G.findings[key] = f"[{tag}] {type(e).__name__}: {detail[:300]}\n    code: {code.strip()[:400]}"
        if G.keep_going:
            return False
        raise Finding(f"{type(e).__name__} from {code.strip()!r}: {detail}") from e


def _first_call(code: str) -> str:
    m = re.search(r"([A-Za-z_][\w.]*)\(", code.split("=", 1)[-1] if "=" in code.split("(")[0] else code)
    return re.sub(r"^[a-z]\d+\.", "", m.group(1)) if m else code[:30]


# -- value strategies -------------------------------------------------------------------------------

N_VOCAB = 376  # write_tiny_llama's vocabulary (checked at start-up)
EOS = 2
INT32_BIG = [2**31, 2**40, -(2**31) - 1]

valid_tok = st.integers(3, N_VOCAB - 1)
bad_tok = st.sampled_from([-1, -2, -(2**31), N_VOCAB, N_VOCAB + 1, 10**6, 2**31 - 1, EOS])
any_tok = st.one_of(valid_tok, valid_tok, bad_tok)
seq_ids = st.sampled_from([-1, 0, 0, 1, 2, 3, 4, 5, 255, 256, 10**6, -2])
positions = st.sampled_from([-1, -2, 0, 1, 3, 7, 8, 15, 16, 31, 63, 64, 100, 511, 512, 10**6, 2**31 - 2, 2**31 - 1])
out_rows = st.sampled_from([-1, -1, 0, 1, -2, 2, 5, 31, -100, 10**6, -(10**6)])
small_n = st.sampled_from([1, 1, 2, 3, 4, 7, 8, 16, 17, 31, 32, 33, 64, 100])
floats = st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.0, 1e-9, 1e9, float("inf"), float("-inf"), float("nan")])


def overflows(t: int) -> bool:
    return not -(2**31) <= t < 2**31


def _ints(strategy):
    return st.one_of(strategy, st.sampled_from(INT32_BIG)) if "int_overflow" not in G.avoid else strategy


GRAMMARS = ['root ::= "a"', 'root ::= [a-z]+', 'root ::= "hello" " world"', 'root ::= ("x" | "y")*',
            'root ::= (', 'foo ::= "x"', 'root ::= [^\\x00]', 'root ::= "" ', 'root ::= root "a"']


class ApiMachine(RuleBasedStateMachine):
    models = Bundle("models")
    contexts = Bundle("contexts")
    batches = Bundle("batches")
    samplers = Bundle("samplers")
    views = Bundle("views")
    gens = Bundle("gens")
    loras = Bundle("loras")
    embedders = Bundle("embedders")

    def __init__(self) -> None:
        super().__init__()
        G.examples += 1
        self.k = 0
        self.ns: dict = {"__name__": "__fuzz__"}
        self.states: list[str] = []
        self.selecting: dict[str, bool] = {}
        self.noncausal: set[str] = set()  # contexts left in non-causal attention
        self.vocab_only: set[str] = set()  # models (and their contexts) without weights
        log(f"# ===== example {G.examples} =====")
        exec(PREAMBLE, self.ns)
        self.allowed = ALLOWED + (self.ns["Boom"],)
        self.ns["MODELS"] = list(G.models)
        self.ns["LORA"] = G.lora
        self.ns["TMP"] = G.tmpdir

    def name(self, prefix: str) -> str:
        self.k += 1
        return f"{prefix}{self.k}"

    def run(self, code: str, tag: str | None = None) -> bool:
        self.last_ok = execute(self.ns, code, tag, self.allowed)
        return self.last_ok

    def teardown(self) -> None:
        code = ("for _k, _v in list(globals().items()):\n"
                "    if _k[:1] == 'g' and _k[1:].isdigit(): _v.close()\n"
                "for _k, _v in list(globals().items()):\n"
                "    if _k[:1] in 'ecsm' and _k[1:].isdigit() and hasattr(_v, 'close'): _v.close()\n"
                "gc.collect()")
        try:
            self.run(code)
        finally:
            self.ns.clear()
            gc.collect()

    # -- models ---------------------------------------------------------------------------------
    @initialize(target=models)
    def first_model(self):
        v = self.name("m")
        self.run(f"{v} = lb.Model(MODELS[0])")
        return v if self.last_ok else multiple()

    @rule(target=models, which=st.integers(0, 3), mmap=st.sampled_from([None, True, False]))
    def load_model(self, which, mmap):
        v = self.name("m")
        self.run(f"{v} = lb.Model(MODELS[{which % len(G.models)}], use_mmap={mmap})")
        return v if self.last_ok else multiple()

    @rule(target=models, which=st.integers(0, 3), kw=st.sampled_from([
        "vocab_only=True", "check_tensors=True", "n_gpu_layers=-1, main_gpu=7, split_mode='row'", "use_mlock=True",
        "split_mode='nope'", "n_gpu_layers=2**31", "use_extra_bufts=False, no_host=True", "check=False"]))
    def odd_model(self, which, kw):
        v = self.name("m")
        tag = "vocab_only" if "vocab_only" in kw else "int_overflow" if "2**31" in kw else None
        self.run(f"{v} = lb.Model(MODELS[{which % len(G.models)}], {kw})", tag=tag)
        if self.last_ok and tag == "vocab_only":
            self.vocab_only.add(v)
        return v if self.last_ok else multiple()

    @rule(m=models, rare=st.integers(0, 3))
    def close_model(self, m, rare):
        if rare:  # closing ends most of what an example can do: keep it rare
            return
        self.run(f"{m}.close()")

    @rule(m=models, attr=st.sampled_from(
        ["n_ctx_train", "n_embd", "n_embd_out", "n_layer", "n_head", "n_swa", "n_params", "size", "n_cls_out",
         "is_recurrent", "has_encoder", "description", "metadata", "name", "architecture", "vocab.bos", "vocab.eos",
         "vocab.eot", "vocab.nl", "vocab.type", "vocab.add_bos", "vocab.fim_pre", "vocab.mask"]))
    def model_fact(self, m, attr):
        self.run(f"_ = {m}.{attr}")

    @rule(m=models, key=st.sampled_from(["general.name", "llama.context_length", "", "nope", "a" * 300]))
    def model_meta(self, m, key):
        self.run(f"_ = {m}.meta({key!r})")

    @rule(m=models, name=st.sampled_from([None, "rerank", "tool_use", "", "x" * 100]))
    def model_template(self, m, name):
        self.run(f"_ = {m}.chat_template({name!r})")

    @rule(m=models, msgs=st.sampled_from([
        '[{"role": "user", "content": "hi"}]', "[]", '[{"role": "user"}]', '[{"content": 1, "role": "x"}]',
        '[{"role": "user", "content": "\\ud800"}]', '[{"role": "user", "content": "x" * 5000}]', "[None]", '["ab"]']),
        template=st.sampled_from([None, "chatml", "gemma", "llama3", "nonsense", "", "{{ bad", "{% for %}"]),
        add=st.booleans())
    def chat(self, m, msgs, template, add):
        self.run(f"_ = {m}.apply_chat_template({msgs}, {add}, template={template!r})", tag="chat")

    # -- vocab ----------------------------------------------------------------------------------
    @rule(m=models, fn=st.sampled_from(["is_control", "is_eog", "text", "token_to_piece"]),
          tok=st.data())
    def vocab_token(self, m, fn, tok):
        t = tok.draw(_ints(any_tok))
        bad = not 0 <= t < N_VOCAB
        self.run(f"_ = {m}.vocab.{fn}({t})", tag="int_overflow" if overflows(t) else ("vocab_oor" if bad else None))

    @rule(m=models, toks=st.data(), fn=st.sampled_from(["detokenize", "detokenize_bytes"]),
          rs=st.booleans(), us=st.booleans())
    def vocab_detok(self, m, toks, fn, rs, us):
        ts = toks.draw(st.lists(_ints(any_tok), max_size=6))
        bad = any(not 0 <= t < N_VOCAB for t in ts)
        self.run(f"_ = {m}.vocab.{fn}({ts}, {rs}, {us})",
                 tag="int_overflow" if any(overflows(t) for t in ts) else ("vocab_oor" if bad else None))

    @rule(m=models, text=st.one_of(st.text(max_size=20), st.sampled_from(
        ["", "hello world", "<|im_start|>user", "\ud800", "\x00", "é" * 50, "<s></s>"]), st.binary(max_size=10)),
        add=st.booleans(), parse=st.booleans())
    def tokenize(self, m, text, add, parse):
        self.run(f"_ = {m}.vocab.tokenize({text!r}, {add}, {parse})")

    @rule(m=models, toks=st.lists(any_tok, max_size=8), special=st.booleans())
    def detokenizer(self, m, toks, special):
        bad = any(not 0 <= t < N_VOCAB for t in toks)
        self.run(f"_d = {m}.vocab.detokenizer({special})\n_ = [_d.feed(t) for t in {toks}] + [_d.flush()]",
                 tag="vocab_oor" if bad else None)

    # -- contexts -------------------------------------------------------------------------------
    @initialize(target=contexts, m=models)
    def first_context(self, m):
        v = self.name("c")
        self.run(f"{v} = lb.Context({m}, n_ctx=128, n_batch=64, n_ubatch=32, n_seq_max=2, n_threads=1)")
        return v if self.last_ok else multiple()

    @rule(target=contexts, m=models, n_ctx=st.sampled_from([0, 1, 8, 16, 32, 64, 128, 256, 512]),
          n_batch=st.sampled_from([1, 4, 16, 32, 64, 512]), n_ubatch=st.sampled_from([1, 4, 16, 32, 512]),
          n_seq_max=st.sampled_from([1, 1, 2, 3, 4]), embeddings=st.booleans(),
          extra=st.dictionaries(st.sampled_from(["swa_full", "kv_unified", "flash_attn", "offload_kqv", "no_perf"]),
                                st.booleans(), max_size=3),
          pooling=st.sampled_from([None, None, "none", "mean", "cls", "last"]))
    def new_context(self, m, n_ctx, n_batch, n_ubatch, n_seq_max, embeddings, extra, pooling):
        v = self.name("c")
        kw = dict(extra)
        if pooling is not None:
            kw["pooling"] = pooling
        args = ", ".join(f"{k}={val!r}" for k, val in kw.items())
        self.run(f"{v} = lb.Context({m}, n_ctx={n_ctx}, n_batch={n_batch}, n_ubatch={n_ubatch}, "
                 f"n_seq_max={n_seq_max}, embeddings={embeddings}, n_threads=1{', ' + args if args else ''})",
                 tag="vocab_only" if m in self.vocab_only else None)
        return v if self.last_ok else multiple()

    @rule(target=contexts, m=models, kw=st.sampled_from([
        "n_threads=-1", "n_threads=1, n_threads_batch=-3", "n_seq_max=0", "n_seq_max=257", "n_seq_max=300, n_batch=512",
        "n_ctx=-1", "n_batch=0", "n_ubatch=0", "n_ctx=1, n_batch=1, n_ubatch=1", "type_k='q4_0'", "type_k='q4_0', flash_attn=True",
        "type_v='q8_0'", "type_v='q8_0', flash_attn=False", "pooling='nope'", "flash_attn='auto'", "attention='non_causal'",
        "n_outputs_max=1, n_seq_max=2", "rope_freq_base=-1.0", "yarn_ext_factor=float('nan')", "n_ctx=2**31-1",
        "embeddings=True, pooling='rank'", "n_seq_max=4, embeddings=True, n_ubatch=6"]))
    def odd_context(self, m, kw):
        v = self.name("c")
        tag = "pooled_rank" if "rank" in kw else "ctx_odd"
        if "2**31" in kw:
            return multiple()  # would reserve a huge KV cache
        base = ([] if "n_ctx" in kw else ["n_ctx=64"]) + ([] if "n_threads" in kw else ["n_threads=1"])
        self.run(f"{v} = lb.Context({m}, {', '.join(base + [kw])})", tag="vocab_only" if m in self.vocab_only else tag)
        return v if self.last_ok else multiple()

    @rule(c=contexts, rare=st.integers(0, 3))
    def close_context(self, c, rare):
        if rare:  # closing ends most of what an example can do: keep it rare
            return
        self.run(f"{c}.close()")

    @rule(c=contexts, call=st.sampled_from([
        "perf()", "perf_reset()", "synchronize()", "pooling_type", "n_threads", "abort()", "set_threads(1)",
        "set_threads(2, 1)", "set_embeddings(True)", "set_embeddings(False)", "set_causal_attn(False)",
        "set_causal_attn(True)", "memory.can_shift", "memory.clear()", "memory.clear(False)", "set_abort_callback(None)",
        "set_abort_callback(lambda: False)", "set_abort_callback(boom)", "set_outputs(0)", "set_outputs(1)",
        "set_outputs(1000)", "set_outputs(-5)", "cached_tokens(0)", "cached_tokens(7)"]))
    def context_call(self, c, call):
        tag = "ctx_odd" if "set_threads" in call or "set_outputs" in call else None
        self.run(f"_ = {c}.{call}", tag=tag)
        if call.startswith("set_causal_attn") and self.last_ok:
            (self.noncausal.add if "False" in call else self.noncausal.discard)(c)

    @rule(c=contexts, n=st.sampled_from([0, -1]))
    def bad_threads(self, c, n):
        self.run(f"{c}.set_threads({n})", tag="ctx_odd")

    # -- batches --------------------------------------------------------------------------------
    @rule(target=batches, cap=st.sampled_from([0, 1, 4, 16, 64, 600, -3]), nsm=st.sampled_from([0, 1, 1, 2, 4, 5]),
          embd=st.sampled_from([0, 0, 0, 64, 63, 8, -1]))
    def new_batch(self, cap, nsm, embd):
        v = self.name("b")
        self.run(f"{v} = lb.Batch({cap}, {nsm}, {embd})")
        return v if self.last_ok else multiple()

    @rule(b=batches, toks=st.lists(any_tok, max_size=40), pos=st.data(), seq=st.data(),
          logits=st.sampled_from(["'last'", "'all'", "False", "True", "'first'", "None"]))
    def batch_add(self, b, toks, pos, seq, logits):
        p = pos.draw(st.one_of(positions, st.just("np.arange(len(_t))[::-1]")))
        s = seq.draw(st.one_of(seq_ids, st.lists(seq_ids, max_size=5), st.sampled_from(INT32_BIG)))
        tag = "int_overflow" if (s in INT32_BIG if isinstance(s, int) else False) or (
            isinstance(p, int) and p + len(toks) >= 2**31) else None
        self.run(f"_t = {toks}\n{b}.add(_t, {p}, {s}, {logits})", tag=tag)

    @rule(b=batches, n=st.sampled_from([0, 1, 3, 10]), width=st.sampled_from([64, 64, 63, 65, 0]),
          pos=positions, seq=seq_ids)
    def batch_add_embd(self, b, n, width, pos, seq):
        self.run(f"{b}.add_embd(np.random.default_rng(0).standard_normal(({n}, {width})), {pos}, {seq})")

    @rule(b=batches)
    def batch_clear(self, b):
        self.run(f"{b}.clear()")

    @rule(b=batches, poke=st.sampled_from([
        "{b}.n_tokens = {b}.capacity + 3", "{b}.n_tokens = -1", "{b}.n_seq_id[0] = 0", "{b}.n_seq_id[0] = 99",
        "{b}.seq_id[0, 0] = 7", "{b}.seq_id[0, 0] = -1", "{b}.logits[:] = 0", "{b}.pos[0] = -1",
        "{b}.pos[:] = 0", "{b}.token[0] = 10**6", "{b}.n_tokens = {b}.capacity", "{b}.logits[:] = 1"]))
    def batch_poke(self, b, poke):
        self.run(poke.format(b=b), tag="batch_poke")

    # -- decode ---------------------------------------------------------------------------------
    @rule(c=contexts, b=batches)
    def decode(self, c, b):
        self.run(f"{c}.decode({b})")

    @rule(c=contexts, b=batches)
    def encode(self, c, b):
        self.run(f"{c}.encode({b})", tag="encode_big")

    @rule(c=contexts, n=small_n, seq=st.sampled_from([0, 0, 1, 2, 3]), logits=st.sampled_from(["all", "last"]))
    def decode_valid(self, c, n, seq, logits):
        self.run(f"{c}.decode(fresh_batch({c}, {n}, {seq}, {logits!r}))")

    @rule(c=contexts, n=st.sampled_from([33, 64, 100, 513]), enc=st.booleans())
    def noncausal_big(self, c, n, enc):
        fn = "encode" if enc else "decode"
        self.run(f"{c}.set_causal_attn(False)\ntry:\n    {c}.{fn}(fresh_batch({c}, {n}))\n"
                 f"finally:\n    {c}.set_causal_attn(True)", tag="encode_big")

    @rule(c=contexts, m=models, scale=st.sampled_from(["0.0", "1.0", "-2.0", "float('nan')"]))
    def lora_temporary(self, c, m, scale):
        self.run(f"{c}.set_loras({{{m}.load_lora(LORA): {scale}}})\ngc.collect()\n"
                 f"{c}.decode(fresh_batch({c}, 4))", tag="lora_temp")

    @rule(target=loras, m=models)
    def load_lora(self, m):
        v = self.name("l")
        self.run(f"{v} = {m}.load_lora(LORA)")
        return v if self.last_ok else multiple()

    @rule(c=contexts, lora=loras, scale=st.sampled_from([0.5, 1.0, 0.0]), drop=st.booleans())
    def set_lora(self, c, lora, scale, drop):
        extra = f"\n{lora}.close()\n{c}.decode(fresh_batch({c}, 4))" if drop else ""
        self.run(f"{c}.set_loras({{{lora}: {scale}}}){extra}", tag="lora_temp" if drop else None)

    # -- outputs and views ----------------------------------------------------------------------
    @rule(target=views, c=contexts, i=out_rows)
    def logits(self, c, i):
        v = self.name("v")
        self.run(f"{v} = {c}.logits({i})\n_ = touch({v})")
        return v if self.last_ok else multiple()

    @rule(target=views, c=contexts, i=out_rows)
    def embeddings(self, c, i):
        v = self.name("v")
        self.run(f"{v} = {c}.embeddings({i})\n_ = touch({v})")
        return v if self.last_ok else multiple()

    @rule(target=views, c=contexts, seq=seq_ids, n=st.sampled_from([None, None, 0, 1, 64, 65, 10**4, 10**7]))
    def embeddings_seq(self, c, seq, n):
        v = self.name("v")
        tag = "embd_seq_n" if n is not None and n > 64 else None
        self.run(f"{v} = {c}.embeddings_seq({seq}, {n})\n_ = touch({v})", tag=tag)
        return v if self.last_ok else multiple()

    @rule(v=views)
    def read_view(self, v):
        self.run(f"_ = touch({v})", tag="view_after")

    @rule(c=contexts, n=st.sampled_from([1, 32, 64, 512]))
    def outputs_grow(self, c, n):
        """A view from a small decode, read after a decode with many more outputs, and after close."""
        self.run(f"{c}.decode(fresh_batch({c}, 1))\n_v = {c}.logits(-1)\n{c}.memory.clear()\n"
                 f"{c}.decode(fresh_batch({c}, {n}))\n_ = touch(_v)", tag="view_after")

    # -- memory ---------------------------------------------------------------------------------
    @rule(c=contexts, op=st.sampled_from(["seq_rm", "seq_cp", "seq_keep", "seq_add", "seq_div", "seq_pos_min",
                                          "seq_pos_max"]),
          s=seq_ids, s2=seq_ids, p0=st.sampled_from([-1, 0, 1, 3, 10, 100, -5, 2**31 - 1]),
          p1=st.sampled_from([-1, 0, 2, 4, 10, 1000, -7]), d=st.sampled_from([1, 2, -1, 0, -3, 10**6, -(10**6)]))
    def memory_op(self, c, op, s, s2, p0, p1, d):
        args = {"seq_rm": f"{s}, {p0}, {p1}", "seq_cp": f"{s}, {s2}, {p0}, {p1}", "seq_keep": f"{s}",
                "seq_add": f"{s}, {p0}, {p1}, {d}", "seq_div": f"{s}, {p0}, {p1}, {d}", "seq_pos_min": f"{s}",
                "seq_pos_max": f"{s}"}[op]
        tag = None
        if op in ("seq_add", "seq_div") and s == -1:
            tag = "mem_all"
        elif (p0 > p1 >= 0) or p0 < -1 or p1 < -1 or d < 0 or (op == "seq_cp" and s2 != s):
            tag = "mem_odd"
        self.run(f"_ = {c}.memory.{op}({args})", tag=tag)

    # -- state ----------------------------------------------------------------------------------
    @rule(c=contexts, seq=st.sampled_from([None, 0, 1, 5]))
    def state_save(self, c, seq):
        v = self.name("st")
        call = "state_save()" if seq is None else f"seq_state_save({seq})"
        if self.run(f"{v} = {c}.{call}"):
            self.states.append(v)

    @rule(c=contexts, which=st.integers(0, 100), kind=st.sampled_from(
        ["saved", "saved", "empty", "garbage", "truncated", "flipped", "zeros"]), seq=st.sampled_from([None, 0, 1, 3]))
    def state_load(self, c, which, kind, seq):
        if kind in ("saved", "truncated", "flipped") and not self.states:
            kind = "garbage"
        src = self.states[which % len(self.states)] if self.states else None
        data = {"saved": f"{src}", "empty": "b''", "garbage": "bytes(range(256)) * 8",
                "truncated": f"{src}[: len({src}) // 2]", "zeros": "bytes(4096)",
                "flipped": f"bytes(x ^ 0x5A if i % 7 == 3 else x for i, x in enumerate({src}))"}[kind]
        call = f"state_load({data})" if seq is None else f"seq_state_load({data}, {seq})"
        self.run(f"{c}.{call}", tag=None if kind == "saved" else "state_garbage")

    @rule(c=contexts, kind=st.sampled_from(["own", "garbage", "missing", "dir"]), toks=st.lists(any_tok, max_size=4),
          max_tokens=st.sampled_from([None, 1, 0, 10**6]))
    def state_file(self, c, kind, toks, max_tokens):
        path = f"TMP + '/state-{c}.bin'"
        if kind == "own":
            code = f"{c}.state_save_file({path}, {toks})\n_ = {c}.state_load_file({path}, {max_tokens})"
        elif kind == "garbage":
            code = f"open({path}, 'wb').write(b'ggsn' + bytes(range(200)))\n_ = {c}.state_load_file({path}, {max_tokens})"
        elif kind == "missing":
            code = f"_ = {c}.state_load_file(TMP + '/nope.bin')"
        else:
            code = f"{c}.state_save_file(TMP)"
        self.run(code, tag=None if kind == "own" and max_tokens is None else "state_garbage")

    # -- samplers -------------------------------------------------------------------------------
    @rule(target=samplers, m=models, kind=st.sampled_from([
        "greedy()", "dist(1)", "dist()", "top_k(40)", "top_k(0)", "top_k(-5)", "top_p(0.9)", "top_p(0.0, 0)",
        "top_p(2.0, 10**6)", "min_p(0.05)", "min_p(float('nan'))", "typical(0.5)", "typical(0.0, 0)", "temp(0.7)",
        "temp(0.0)", "temp(-1.0)", "temp(float('inf'))", "temp_ext(0.8, 0.5, 1.0)", "temp_ext(0.0, -1.0, 0.0)",
        "xtc(0.5, 0.1)", "xtc(1.0, 0.0, 0)", "top_n_sigma(1.0)", "top_n_sigma(-1.0)", "mirostat({m}.vocab.n_tokens, 1)",
        "mirostat(0, 1, m=0)", "mirostat(1, 1, m=-1)", "mirostat_v2(1)", "mirostat_v2(1, tau=-5.0, eta=float('nan'))",
        "adaptive_p(0.5, 0.9, 1)", "adaptive_p(-1.0, 2.0)", "adaptive_p(float('nan'), -1.0)",
        "penalties(64, 1.1, 0.1, 0.1)", "penalties(0, 1.0)", "penalties(-1, 2.0)", "penalties(64, 0.0)",
        "dry({m}.vocab, {m}.n_ctx_train)", "dry({m}.vocab, 0, penalty_last_n=-1)", "dry({m}.vocab, -5, penalty_last_n=-1)",
        "dry({m}.vocab, 16, breakers=[''])", "dry({m}.vocab, 16, breakers=[])", "dry({m}.vocab, 16, allowed_length=-1)",
        "logit_bias({m}.vocab.n_tokens, {{5: -float('inf'), 6: 2.0}})", "logit_bias({m}.vocab.n_tokens, {{10**6: 1.0}})",
        "logit_bias(0, {{}})", "logit_bias(10, {{5: 1.0}})", "logit_bias(10**6, {{10**5: 1.0}})", "infill({m}.vocab)",
        "from_params({m}.vocab)", "from_params({m}.vocab, temperature=0)",
        "from_params({m}.vocab, grammar='root ::= [a-z]+', repeat_penalty=1.2, logit_bias={{7: 1.0}})",
        "grammar({m}.vocab, {g!r})", "grammar({m}.vocab, {g!r})", "grammar({m}.vocab, 'root ::= \"a\"', root='nope')",
        "grammar_lazy({m}.vocab, {g!r}, trigger_patterns=['hel'])", "grammar_lazy({m}.vocab, {g!r}, trigger_patterns=['('])",
        "grammar_lazy({m}.vocab, {g!r}, trigger_tokens=[5, 6])", "grammar_lazy({m}.vocab, {g!r}, trigger_tokens=[10**6])",
        "grammar_lazy({m}.vocab, {g!r})", "chain()", "chain(lb.Sampler.top_k(40))", "chain(lb.Sampler.greedy())",
        "chain(lb.Sampler.top_k(5), lb.Sampler.temp(0.5), lb.Sampler.dist(3))",
        "chain(PyEdit().as_sampler())", "chain(PySelect().as_sampler())", "chain(PyRaise().as_sampler(), lb.Sampler.greedy())",
        "chain(PyBadIds().as_sampler(), lb.Sampler.grammar({m}.vocab, 'root ::= [a-z]+'))", "PyTruncate().as_sampler()",
        "PyBadSelect().as_sampler()", "PyEdit().as_sampler()", "PyRaise().as_sampler()", "PyBadIds().as_sampler()",
        "chain(lb.Sampler.top_k(3), PyBadSelect().as_sampler(), lb.Sampler.dist(1))"]),
        g=st.sampled_from(GRAMMARS))
    def new_sampler(self, m, kind, g):
        v = self.name("s")
        expr = kind.format(m=m, g=g)
        expr = expr if expr.startswith("Py") else "lb.Sampler." + expr
        tag = "py_sampler" if "Py" in expr else None
        if tag is None and any(x in kind for x in ("-", "nan", "inf", "(0", " 0", "10**", "m=0", "''", "[]", "'('")):
            tag = "sampler_odd"
        self.run(f"{v} = {expr}", tag=tag)
        # does it select a token (else llama_sampler_sample aborts: tagged sample_noselect)?
        last = expr.rsplit("lb.Sampler.", 1)[-1] if expr.startswith("lb.Sampler.chain(") else expr
        self.selecting[v] = bool(re.match(r"(lb\.Sampler\.)?(greedy|dist|mirostat|from_params|PySelect|PyTruncate|PyBadIds"
                                          r"|chain\(PyBadIds)", last)) and "PyBadSelect" not in expr
        return v if self.last_ok else multiple()

    def noselect(self, s) -> bool:
        return s is not None and not self.selecting.get(s, False)

    @rule(target=samplers, m=models, g=st.sampled_from(GRAMMARS), lazy=st.booleans(),
          then=st.sampled_from(["", "greedy()", "dist(7)", "top_k(3)"]))
    def grammar_sampler(self, m, g, lazy, then):
        v = self.name("s")
        gs = (f"lb.Sampler.grammar_lazy({m}.vocab, {g!r}, trigger_patterns=['h'])" if lazy
              else f"lb.Sampler.grammar({m}.vocab, {g!r})")
        self.run(f"{v} = lb.Sampler.chain({gs}{', lb.Sampler.' + then if then else ''})")
        self.selecting[v] = then.startswith(("greedy", "dist"))
        return v if self.last_ok else multiple()

    @rule(m=models, depth=st.sampled_from([100, 1000, 30000, 100000]),
          where=st.sampled_from(["grammar", "grammar_lazy", "trigger"]))
    def deep_grammar(self, m, depth, where):
        if where == "trigger":
            code = (f"_ = lb.Sampler.grammar_lazy({m}.vocab, 'root ::= \"a\"', "
                    f"trigger_patterns=['(' * {depth} + 'a' + ')' * {depth}])")
        else:
            code = f"_ = lb.Sampler.{where}({m}.vocab, 'root ::= ' + '(' * {depth} + '\"a\"' + ')' * {depth})"
        self.run(code, tag="grammar_deep" if depth > 1000 else None)

    @rule(s=samplers, m=models, text=st.sampled_from(["a", "b", "hello world", "xyz", "\n", "aaaa", "<|im_end|>"]),
          eog=st.booleans())
    def accept_text(self, s, m, text, eog):
        """Accept the tokens of a text (which a grammar may reject), then maybe end-of-generation."""
        self.run(f"for _t in {m}.vocab.tokenize({text!r}, False, True).tolist() + [{m}.vocab.eos] * {int(eog)}:\n"
                 f"    {s}.accept(_t)", tag="accept_bad")

    @rule(m=models, c=contexts, kind=st.sampled_from(["grammar", "grammar_lazy", "infill", "dry", "chain"]),
          use=st.sampled_from(["accept(70)", "accept(5)", "apply(cands(np.arange(376)))", "reset()", "clone()",
                               "sample({c})"]))
    def sampler_outlives_model(self, m, c, kind, use):
        """A vocab-holding sampler made from a model of its own, used after that model is closed."""
        make = {"grammar": "lb.Sampler.grammar(_m.vocab, 'root ::= [a-z]+')",
                "grammar_lazy": "lb.Sampler.grammar_lazy(_m.vocab, 'root ::= [a-z]+', trigger_patterns=['h'])",
                "infill": "lb.Sampler.infill(_m.vocab)", "dry": "lb.Sampler.dry(_m.vocab, 64)",
                "chain": "lb.Sampler.chain(lb.Sampler.grammar(_m.vocab, 'root ::= [a-z]+'), lb.Sampler.greedy())"}[kind]
        self.run(f"_m = lb.Model({m}.path)\n_s = {make}\n_m.close()\ngc.collect()\n_ = [bytearray(1000) for _ in range(5000)]\n"
                 f"_ = _s.{use.format(c=c)}", tag="sampler_after_model")

    @rule(c=contexts, victim=st.sampled_from(["lambda ch: ch", "lambda ch: {c}", "lambda ch: {c}.model",
                                               "lambda ch: lambda: {c}.decode(fresh_batch({c}, 4))",
                                               "lambda ch: lambda: {c}.memory.clear()",
                                               "lambda ch: lambda: ch.reset()"]),
          grammar=st.booleans(), how=st.sampled_from(["sample", "generate"]))
    def py_reentrant(self, c, victim, grammar, how):
        v = self.name("s")
        more = f"lb.Sampler.grammar({c}.model.vocab, 'root ::= [a-z]+')" if grammar else ""
        self.run(f"{v} = closer_chain({victim.format(c=c)}{', ' + more if more else ''})", tag="py_reentrant")
        if not self.last_ok:
            return
        if how == "sample":
            self.run(f"{c}.decode(fresh_batch({c}, 2))\n_ = {v}.sample({c})", tag="py_reentrant")
        else:
            self.run(f"_ = lb.complete({c}, 'hello', max_tokens=3, sampler={v})",
                     tag="noncausal_gen" if c in self.noncausal else "py_reentrant")

    @rule(c=contexts, how=st.sampled_from(["sample", "apply", "generate"]))
    def stale_candidates(self, c, how):
        use = {"sample": f"{c}.decode(fresh_batch({c}, 2))\n_ = _s.sample({c})",
               "apply": "_a = cands(np.arange(376))\n_ = _s.apply(_a)\ndel _a\ngc.collect()",
               "generate": f"_ = lb.complete({c}, 'hello', max_tokens=2, sampler=_s)"}[how]
        self.run(f"_s = lb.Sampler.chain(PyKeep().as_sampler())\n{use}\n_ = use_kept()\n_s.close()\n_ = use_kept()",
                 tag="noncausal_gen" if how == "generate" and c in self.noncausal else "py_keep_cur")

    @rule(m=models, g=st.sampled_from(GRAMMARS[:4]), toks=st.lists(st.sampled_from([2, 5, 40, 70, 71, 300, 375]),
                                                                     min_size=1, max_size=4))
    def clone_accept(self, m, g, toks):
        self.run(f"_g = lb.Sampler.grammar({m}.vocab, {g!r})\n_c = _g.clone()\nfor _t in {toks}:\n    _c.accept(_t)",
                 tag="clone_grammar")

    @rule(c=contexts, field=st.sampled_from(["n_seq_id", "seq_id", "pos", "token", "logits"]),
          raw=st.sampled_from(["[1, 0, 0, 16]", "[0, 0, 0, 128]", "[255, 255, 255, 127]", "[5, 1, 0, 0]"]))
    def batch_dtype(self, c, field, raw):
        self.run(f"_b = fresh_batch({c}, 4)\n_b.{field}.dtype = np.uint8\n_b.{field}.flat[0:4] = {raw}\n{c}.decode(_b)\n"
                 f"_ = {c}.logits(-1)", tag="batch_dtype")

    @rule(target=samplers, parts=st.lists(samplers, min_size=1, max_size=3, unique=True))
    def chain_of(self, parts):
        v = self.name("s")
        self.run(f"{v} = lb.Sampler.chain({', '.join(parts)})")
        self.selecting[v] = self.selecting.get(parts[-1], False)
        return v if self.last_ok else multiple()

    @rule(s=samplers, other=samplers)
    def chain_add(self, s, other):
        self.run(f"{s}.add({other})")
        if self.last_ok:
            self.selecting[s] = self.selecting.get(other, False)

    @rule(s=samplers, c=contexts, idx=out_rows)
    def sample(self, s, c, idx):
        self.run(f"_ = {s}.sample({c}, {idx})", tag="sample_noselect")

    @rule(s=samplers, tok=st.data())
    def accept(self, s, tok):
        t = tok.draw(_ints(any_tok))
        tag = "int_overflow" if overflows(t) else "accept_bad"
        self.run(f"{s}.accept({t})", tag=tag)

    @rule(s=samplers, kind=st.sampled_from([
        "cands(np.arange(376))", "cands(np.arange(376))", "cands(np.arange(10))", "cands([])", "cands([5])",
        "cands([10**6, 5])", "cands([-1, 3])", "cands(np.arange(376), np.full(376, np.nan))",
        "cands(np.arange(376), np.full(376, -np.inf))", "cands(np.arange(376))[::2]", "np.zeros(3)"]))
    def apply(self, s, kind):
        safe = kind in ("cands(np.arange(376))", "cands(np.arange(10))", "cands([5])")
        self.run(f"_ = {s}.apply({kind})", tag=None if safe else "apply_bad")

    @rule(s=samplers, call=st.sampled_from(["reset()", "clone()", "len()", "name", "seed", "close()", "closed"]))
    def sampler_call(self, s, call):
        if call == "len()":
            self.run(f"_ = len({s})")
        elif call == "clone()":
            v = self.name("s")
            self.run(f"{v} = {s}.clone()")
            self.selecting[v] = self.selecting.get(s, False)
        else:
            self.run(f"_ = {s}.{call}")

    # -- generation -----------------------------------------------------------------------------
    @rule(c=contexts, prompt=st.sampled_from(["'hello world'", "''", "[]", "[5, 6, 7]", "[10**6]", "[-1]",
                                               "'x' * 200", "b'hello'", "None", "[2]", "'<|im_end|>'"]),
          s=st.one_of(st.none(), samplers), max_tokens=st.sampled_from([1, 4, 8, 0, -1]),
          stop=st.sampled_from(["()", "['l']", "['']", "['\\n', 'lo']", "'l'"]), seq=st.sampled_from([0, 0, 1, 3, -1, 9]),
          reuse=st.booleans(), eog=st.booleans())
    def complete(self, c, prompt, s, max_tokens, stop, seq, reuse, eog):
        tag = None if max_tokens > 0 and seq in (0, 1) and prompt not in ("[10**6]", "[-1]", "None") else "gen_odd"
        tag = "sample_noselect" if self.noselect(s) else tag
        tag = "noncausal_gen" if c in self.noncausal else tag
        self.run(f"_ = lb.complete({c}, {prompt}, max_tokens={max_tokens}, sampler={s}, stop={stop}, seq_id={seq}, "
                 f"reuse_cache={reuse}, ignore_eog={eog})", tag=tag)

    @rule(c=contexts, m=models)
    def chat_generate(self, c, m):
        self.run(f"_ = list(lb.generate({c}, messages=[{{'role': 'user', 'content': 'hi'}}], max_tokens=4))",
                 tag="noncausal_gen" if c in self.noncausal else None)

    @rule(c=contexts, prompts=st.lists(st.sampled_from(["'a'", "'hello'", "[5, 6]", "''", "[10**6]"]), min_size=0,
                                       max_size=5),
          smp=st.sampled_from(["None", "lambda i: lb.Sampler.greedy()", "[lb.Sampler.dist(i) for i in range({n})]",
                               "[lb.Sampler.greedy()] * {n}", "lambda i: lb.Sampler.top_k(3)"]),
          max_tokens=st.sampled_from(["4", "[3] * {n}", "[1, 2]", "0"]),
          stop=st.sampled_from(["()", "['l']", "[['l']] * {n}", "[[]]"]))
    def generate_many(self, c, prompts, smp, max_tokens, stop):
        n = len(prompts)
        self.run(f"_ = list(lb.generate_many({c}, [{', '.join(prompts)}], samplers={smp.format(n=n)}, "
                 f"max_tokens={max_tokens.format(n=n)}, stop={stop.format(n=n)}))",
                 tag="noncausal_gen" if c in self.noncausal else "sample_noselect" if "top_k" in smp else "gen_odd")

    @rule(c=contexts, n_past=st.sampled_from([None, 0, 1, 3, 10**6, -1]), seq=st.sampled_from([0, 1, 5]),
          prefill=st.sampled_from([None, "lambda: 3", "boom", "lambda: -1", "lambda: 10**6"]))
    def generate_after(self, c, n_past, seq, prefill):
        self.run(f"_ = list(lb.generate_after({c}, {n_past}, prefill={prefill}, seq_id={seq}, max_tokens=3))",
                 tag="gen_after")

    @rule(target=gens, c=contexts, s=st.one_of(st.none(), samplers),
          prompt=st.sampled_from(["'hello world'", "[5, 6, 7, 8]", "'x' * 80"]))
    def start_generation(self, c, s, prompt):
        v = self.name("g")
        self.run(f"{v} = lb.generate({c}, {prompt}, max_tokens=16, sampler={s})\n_ = next({v}, None)",
                 tag="noncausal_gen" if c in self.noncausal else "sample_noselect" if self.noselect(s) else None)
        return v if self.last_ok else multiple()

    @rule(g=gens, k=st.integers(1, 5))
    def advance(self, g, k):
        self.run(f"for _ in range({k}): next({g}, None)")

    @rule(g=gens)
    def close_gen(self, g):
        self.run(f"{g}.close()")

    @rule(c=contexts, prompt=st.sampled_from(["'x' * 50", "'hello'"]), delay=st.sampled_from([0.0, 0.001, 0.005]))
    def cancel_thread(self, c, prompt, delay):
        self.run(f"_ = abort_during_generate({c}, {prompt}, {delay})", tag="noncausal_gen" if c in self.noncausal else None)

    # -- threads --------------------------------------------------------------------------------
    @rule(c=contexts, victim=st.sampled_from(["close", "model_close"]), n=st.sampled_from([8, 32, 64]),
          delay=st.sampled_from([0.0, 0.002, 0.01]))
    def close_during_decode(self, c, victim, n, delay):
        self.run(f"mutate_during_decode({c}, {victim!r}, {delay}, {n})", tag="close_thread")

    @rule(c=contexts, more=st.sampled_from(["()", "(lb.Sampler.grammar({c}.model.vocab, 'root ::= [a-z]+'),)",
                                             "(lb.Sampler.top_k(5), lb.Sampler.penalties(8, 1.2))"]),
          delay=st.sampled_from([0.0, 0.005, 0.03]))
    def close_sampler_thread(self, c, more, delay):
        self.run(f"close_sampler_while_sampling({c}, lambda: {more.format(c=c)}, {delay})", tag="sampler_thread")

    @rule(m=models, s=samplers, k=st.sampled_from([2, 3]), rounds=st.sampled_from([2, 5]))
    def share_sampler(self, m, s, k, rounds):
        self.run(f"_ = share_sampler({m}, {s}, {k}, {rounds})",
                 tag="sample_noselect" if self.noselect(s) else "sampler_thread")

    @rule(c=contexts, n=st.sampled_from([4, 16]), k=st.sampled_from([2, 3]))
    def decode_threads(self, c, n, k):
        self.run(f"decode_in_threads({c}, {n}, {k})")

    @rule(c=contexts, op=st.sampled_from(MUTATION_OPS), delay=st.sampled_from([0.0, 0.001, 0.005]))
    def mutate_thread(self, c, op, delay):
        self.run(f"mutate_during_decode({c}, {op!r}, {delay})", tag="gate_thread")

    @rule(c=contexts, op=st.sampled_from(MUTATION_OPS), where=st.sampled_from(["abort", "sampler"]))
    def reenter(self, c, op, where):
        self.run(f"reenter_from_callback({c}, {op!r}, {where!r})", tag="gate_reenter")

    @rule(c=contexts, op=st.sampled_from(MUTATION_OPS), k=st.sampled_from([1, 3]))
    def between_steps(self, c, op, k):
        self.run(f"_ = mutate_between_steps({c}, {op!r}, {k})",
                 tag="noncausal_gen" if c in self.noncausal else "gate_steps")

    @rule(c=contexts, op=st.sampled_from(MUTATION_OPS), delay=st.sampled_from([0.0, 0.002, 0.02]),
          raising=st.booleans())
    def engine_fire(self, c, op, delay, raising):
        self.run(f"_ = engine_under_fire({c}, {op!r}, {delay}, {raising})",
                 tag="noncausal_gen" if c in self.noncausal else "gate_engine")

    @rule(m=models, delay=st.sampled_from([0.0, 0.001, 0.01]), rare=st.integers(0, 9))
    def getters_close(self, m, delay, rare):
        if rare == 0:  # it closes the model: rarely, or nothing else runs
            self.run(f"getters_while_closing({m}, {delay})", tag="close_thread")

    # -- embedder -------------------------------------------------------------------------------
    @rule(target=embedders, m=models, pooling=st.sampled_from([None, "mean", "cls", "last", "none", "rank", "bogus"]),
          n_ctx=st.sampled_from([None, 16, 64]))
    def new_embedder(self, m, pooling, n_ctx):
        v = self.name("e")
        self.run(f"{v} = lb.Embedder({m}, pooling={pooling!r}, n_ctx={n_ctx}, n_threads=1)", tag="embedder")
        return v if self.last_ok else multiple()

    @rule(e=embedders, texts=st.sampled_from(["['hello', 'world']", "[]", "['']", "'hello'", "['x' * 300]",
                                               "['a'] * 9", "[1]"]),
          kw=st.sampled_from(["", "normalize='l2'", "normalize=0", "normalize='pnorm', p=-1", "dim=8", "dim=0",
                              "dim=10**6", "truncate=True"]),
          fn=st.sampled_from(["embed", "embed_tokens", "rerank_tokens", "close"]))
    def embed(self, e, texts, kw, fn):
        if fn == "close":
            self.run(f"{e}.close()")
        elif fn == "rerank_tokens":
            self.run(f"_ = {e}.rerank_tokens('q', {texts})", tag="embedder")
        else:
            self.run(f"_ = {e}.{fn}({texts}{', ' + kw if kw else ''})", tag="embedder")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", action="append", default=[], help="GGUF model (repeatable; default: tiny random llamas)")
    ap.add_argument("--log", default=None, help="call log (default: $TMPDIR/fuzz_api.log)")
    ap.add_argument("--avoid", default="", help="comma-separated tags of hostile calls to skip (see --list-tags)")
    ap.add_argument("--keep-going", action="store_true", help="record findings and continue (no shrinking)")
    ap.add_argument("--no-shrink", action="store_true")
    ap.add_argument("--workdir", default=None, help="where the models and state files go (default: a new temp dir)")
    ap.add_argument("--list-tags", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="show llama.cpp's log (warnings and errors)")
    ap.add_argument("--replay", default=None, metavar="LOG", help="re-run the last example of a call log")
    args = ap.parse_args(argv)

    if args.list_tags:
        for k, v in TAGS.items():
            print(f"{k:20s} {v}")
        return 0
    G.avoid = {t.strip() for t in args.avoid.split(",") if t.strip()}
    unknown = G.avoid - set(TAGS)
    if unknown:
        ap.error(f"unknown tags: {', '.join(sorted(unknown))}")
    G.keep_going = args.keep_going
    if not args.verbose:
        logging.getLogger("llamabind").setLevel(logging.CRITICAL)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    G.tmpdir = tempfile.mkdtemp(prefix="fuzz_api-", dir=args.workdir)
    import faulthandler

    faulthandler.enable(all_threads=True)

    from tinymodels import write_tiny_llama, write_tiny_lora

    G.models = args.model or [write_tiny_llama(os.path.join(G.tmpdir, "tiny-a.gguf"), seed=0),
                              write_tiny_llama(os.path.join(G.tmpdir, "tiny-b.gguf"), seed=1, f16=True)]
    G.lora = write_tiny_lora(os.path.join(G.tmpdir, "lora.gguf"))
    with lb.Model(G.models[0]) as m:
        if m.vocab.n_tokens != N_VOCAB:
            print(f"fuzz: note: model vocabulary {m.vocab.n_tokens} != {N_VOCAB}; ids are tuned for the tiny llama")

    try:
        return replay(args.replay) if args.replay else _run(args)
    finally:
        G.log = None
        shutil.rmtree(G.tmpdir, ignore_errors=True)


def _run(args: argparse.Namespace) -> int:
    log_path = args.log or os.path.join(tempfile.gettempdir(), "fuzz_api.log")
    G.log = open(log_path, "w", buffering=1)
    log("# llamabind fuzz_api call log; helpers: the PREAMBLE of tests/fuzz_api.py")
    log(f"# models: {G.models}  lora: {G.lora}  seed: {args.seed}")
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([] if args.no_shrink or args.keep_going else [Phase.shrink])
    cfg = settings(max_examples=args.examples, stateful_step_count=args.steps, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck), phases=phases, print_blob=False,
                   report_multiple_bugs=False)
    machine = hyp_seed(args.seed)(ApiMachine)
    status = 0
    t0 = time.perf_counter()
    try:
        run_state_machine_as_test(machine, settings=cfg)
    except Finding as e:
        print(f"fuzz: FINDING: {e}", file=sys.stderr)
        status = 1
    dt = time.perf_counter() - t0
    for text in G.findings.values():
        print(f"fuzz: finding {text}", file=sys.stderr)
    if G.findings:
        status = 1
    print(f"fuzz: {G.examples} examples, {G.calls} calls, 0 crashes, {len(G.findings)} findings ({dt:.1f} s)")
    return status


def replay(path: str) -> int:
    """Run the last example of a call log, printing each entry as it runs."""
    text = Path(path).read_text()
    part = text.rsplit("# ===== example", 1)[-1]
    entries: list[str] = []
    for line in part.splitlines():
        if line.startswith(">>> "):
            entries.append(line[4:].split("   # [")[0])
        elif line.startswith("... ") and entries:
            entries[-1] += "\n" + line[4:]
    ns: dict = {"__name__": "__fuzz__", "MODELS": G.models, "LORA": G.lora, "TMP": G.tmpdir}
    exec(PREAMBLE, ns)
    G.keep_going = True
    for code in entries:
        print(_entry(code), flush=True)
        ok = execute(ns, code, None, ALLOWED + (ns["Boom"],))
        if not ok:
            print("#  (raised an allowed error or a finding)", flush=True)
    for text in G.findings.values():
        print(f"fuzz: finding {text}", file=sys.stderr)
    print(f"fuzz: replayed {len(entries)} calls, {len(G.findings)} findings")
    return 1 if G.findings else 0


if __name__ == "__main__":
    sys.exit(main())
