"""What the runtime examples needed from the API, proved on tiny real models: grammar limits,
projector hashes, token timestamps and inter-token latency, a per-token callback that ends a
generation, a thinking budget, left truncation, next-token scoring, embedding token counts and
prefix reuse refused on a recurrent model."""

from __future__ import annotations

import numpy as np
import pytest

import gguf
import llamabind as lb
from llamabind import mtmd
from llamabind.embeddings import Embedder
from llamabind.gbnf import GrammarLimits, check_grammar, grammar_stats
from llamabind.generation import choice_probs, classify, next_logits, reuse_refused
from llamabind.generation.truncate import kept_prefix
from llamabind.model import sha256_file
from conftest import TEMPLATES
from tinymm import write_tiny_mmproj
from tinymodels import tiny_vocab, write_tiny_llama


@pytest.fixture(scope="module")
def ctx(tiny_model):
    with lb.Context(tiny_model, n_ctx=256, n_threads=2) as c:
        yield c


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, llama_test_material):
    """A tiny random model with Qwen's vocabulary and Qwen3's template (thinking tags, tool calls)."""
    path = write_tiny_llama(tmp_path_factory.mktemp("qwen") / "qwen3.gguf", n_embd=16, n_ff=32, f16=True,
                            template=(TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text(),
                            vocab_from=llama_test_material / "models" / "ggml-vocab-qwen2.gguf")
    with lb.Model(path) as m:
        yield m


class Script(lb.PySampler):
    """Makes the model say ``tokens`` (then the last one forever), whatever it would have said."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens, self.i = [int(t) for t in tokens], 0

    def apply(self, cur):
        cur.data["logit"][cur.data["id"] != self.tokens[min(self.i, len(self.tokens) - 1)]] = -np.inf

    def accept(self, token):
        self.i += 1


def scripted(vocab, text, repeat=""):
    toks = list(vocab.tokenize(text, add_special=False, parse_special=True))
    toks += list(vocab.tokenize(repeat, add_special=False, parse_special=True)) * 100 if repeat else []
    return lb.Sampler.chain(Script(toks).as_sampler(), lb.Sampler.greedy())


# -- grammar limits ---------------------------------------------------------------------------

def test_grammar_stats_count_outside_literals_classes_and_comments():
    g = 'root ::= "a|b" | [|x] | item # one | two\nitem ::= ("c" | "d")+\n'
    s = grammar_stats(g)
    assert (s.n_bytes, s.n_rules, s.n_alternations, s.depth) == (len(g), 2, 3, 1)


def test_grammar_limits_refuse_before_llama_cpp(tiny_model):
    many = "root ::= " + " | ".join(f'"w{i}"' for i in range(300))
    with pytest.raises(lb.InvalidInputError, match="299 alternatives, more than the 256"):
        lb.Sampler.grammar(tiny_model.vocab, many, limits=GrammarLimits(max_alternations=256))
    with pytest.raises(lb.InvalidInputError, match="bytes"):
        check_grammar(many, GrammarLimits(max_bytes=100))
    with pytest.raises(lb.InvalidInputError, match="rules"):
        check_grammar("a ::= b\nb ::= c\nroot ::= a", GrammarLimits(max_rules=2))
    with pytest.raises(lb.InvalidInputError, match="nests deeper"):
        check_grammar("root ::= " + "(" * 2001 + '"a"' + ")" * 2001)
    lb.Sampler.grammar(tiny_model.vocab, many, limits=GrammarLimits(max_alternations=300)).close()


# -- projector hash ---------------------------------------------------------------------------

def test_projector_sha256_is_checked(tiny_model, tmp_path):
    path = write_tiny_mmproj(tmp_path / "mmproj.gguf")
    digest = sha256_file(path)
    with pytest.raises(lb.ModelLoadError, match="does not match"):
        mtmd.MtmdContext(tiny_model, path, sha256="0" * 64, n_threads=2)
    with mtmd.MtmdContext(tiny_model, path, sha256=digest.upper(), n_threads=2) as mctx:
        assert mctx.supports_vision


# -- timestamps, callback ---------------------------------------------------------------------

def test_token_events_carry_times_and_done_reports_itl(ctx):
    events = list(lb.generate(ctx, "hello", max_tokens=12, ignore_eog=True))
    times = [e.time for e in events if isinstance(e, lb.TokenEvent) and e.token is not None]
    done = events[-1]
    assert len(times) == 12 and all(b >= a for a, b in zip(times, times[1:]))
    gaps = np.diff(times)
    t = done.timings
    assert t.itl_mean_s == pytest.approx(gaps.mean()) and t.itl_p50_s == pytest.approx(np.median(gaps))
    assert t.itl_p95_s == pytest.approx(np.percentile(gaps, 95)) and t.ttft_s > 0


def test_a_failing_token_callback_ends_the_generation_with_its_text(ctx):
    got = []

    def cb(ev):
        got.append(ev.text)
        if len(got) == 4:
            raise RuntimeError("consumer gone")

    with pytest.raises(RuntimeError, match="consumer gone") as e:
        lb.complete(ctx, "hello", max_tokens=30, ignore_eog=True, on_token=cb)
    done = e.value.done[0]
    assert done.finish_reason == "error" and len(done.tokens) == 4 and done.text == "".join(got)
    assert lb.complete(ctx, "hello", max_tokens=3, ignore_eog=True).usage.completion_tokens == 3


def test_closing_the_stream_releases_the_context(ctx):
    events = lb.generate(ctx, "hello", max_tokens=50, ignore_eog=True)
    next(events), next(events)
    events.close()
    assert lb.complete(ctx, "hello", max_tokens=2, ignore_eog=True).usage.cached_tokens > 0


# -- thinking budget --------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0, 5])
def test_reasoning_budget_forces_the_end_of_thinking(qwen, budget):
    with lb.Context(qwen, n_ctx=512, n_threads=2) as c:
        smpl = scripted(qwen.vocab, "<think>", " a")
        done = lb.complete(c, messages=[{"role": "user", "content": "hi"}], sampler=smpl, max_tokens=12,
                           enable_thinking=True, reasoning_budget=budget)
    assert done.text.startswith("<think>" + " a" * budget + "</think>"), done.text
    assert done.message.reasoning_content.strip() == " a".join([""] * (budget + 1)).strip()
    assert done.message.content.strip().startswith("a")


def test_reasoning_budget_needs_messages_and_a_count(ctx):
    with pytest.raises(lb.InvalidInputError, match="need messages"):
        lb.complete(ctx, "hi", reasoning_budget=3)
    with pytest.raises(lb.InvalidInputError, match="reasoning_budget"):
        lb.complete(ctx, messages=[{"role": "user", "content": "hi"}], reasoning_budget=-1)


# -- left truncation --------------------------------------------------------------------------

def test_truncate_left_keeps_bos_or_the_system_messages(ctx):
    long = "hello world " * 200
    with pytest.raises(lb.ContextOverflowError):
        lb.complete(ctx, long, max_tokens=8)
    done = lb.complete(ctx, long, max_tokens=8, truncate="left", ignore_eog=True)
    kept = ctx.tokens.get(0)
    full = ctx.vocab.tokenize(long)
    assert done.usage.prompt_tokens == 256 - 8 and done.usage.truncated_tokens == full.size - (256 - 8)
    assert kept[0] == ctx.vocab.bos and kept[1:done.usage.prompt_tokens] == list(full[-(256 - 9):])

    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": long}]
    tokens = lb.generation.render_prompt(ctx, messages=msgs)
    text = ctx.model.apply_chat_template(msgs, True)
    n_keep = kept_prefix(ctx, tokens, text, msgs, True)
    head = ctx.vocab.detokenize(tokens[:n_keep], unparse_special=True)
    assert head.replace(" ", "").endswith("Youareterse.<|im_end|>\n<|im_start|>user\n"), head  # SPM spaces
    done = lb.complete(ctx, messages=msgs, max_tokens=8, truncate="left", ignore_eog=True)
    assert ctx.tokens.get(0)[:n_keep] == list(tokens[:n_keep])
    assert ctx.tokens.get(0)[n_keep:done.usage.prompt_tokens] == list(tokens[-(done.usage.prompt_tokens - n_keep):])
    with pytest.raises(lb.InvalidInputError, match="truncate"):
        lb.complete(ctx, long, truncate="middle")


# -- next-token scoring -----------------------------------------------------------------------

def test_next_logits_are_the_decoded_prompts_last_row(ctx):
    row = next_logits(ctx, "hello world")
    toks = ctx.vocab.tokenize("hello world")
    ctx.memory.clear()
    b = lb.Batch(16)
    b.add(toks, 0, 0, logits="last")
    ctx.decode(b)
    np.testing.assert_allclose(row, ctx.logits(-1), rtol=1e-5, atol=1e-5)
    ctx.tokens.forget(0)
    next_logits(ctx, "hello world")
    p = choice_probs(ctx, "hello world", choices=["hello", "world"])
    ids = [int(ctx.vocab.tokenize(w, False)[0]) for w in ("hello", "world")]
    e = np.exp(row[ids] - row[ids].max())
    np.testing.assert_allclose(p, e / e.sum(), rtol=1e-5)
    label, probs = classify(ctx, "hello world", labels=["hello", "world"])
    assert label == ["hello", "world"][int(np.argmax(p))] and sum(probs.values()) == pytest.approx(1.0)
    with pytest.raises(lb.InvalidInputError, match="different tokens"):
        choice_probs(ctx, "hello", choices=["hello", "hello there"])


# -- embeddings -------------------------------------------------------------------------------

def test_embed_with_usage_counts_tokens(tiny_model):
    with Embedder(tiny_model, pooling="mean", n_ctx=128, n_threads=2) as emb:
        out = emb.embed_with_usage(["hello world", "hello"], prefix="query: ", dim=16)
        sizes = [t.size for t in emb.tokenize(["hello world", "hello"], prefix="query: ")]
        assert out.n_tokens == tuple(sizes) and out.total_tokens == sum(sizes)
        assert out.vectors.shape == (2, 16)
        np.testing.assert_allclose(np.linalg.norm(out.vectors, axis=1), 1.0, rtol=1e-5)


# -- recurrent models -------------------------------------------------------------------------

def write_tiny_mamba(path, n_embd=32, n_layer=2, d_inner=64, d_state=8, dt_rank=4, d_conv=4) -> str:
    """A random 2-layer Mamba with the tiny vocabulary: a recurrent memory, no per-position history."""
    tokens, scores, types = tiny_vocab()
    rng = np.random.default_rng(0)

    def mat(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_ssm_conv_kernel(d_conv)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(d_state)
    w.add_ssm_time_step_rank(dt_rank)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", mat(len(tokens), n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(p + "ssm_in.weight", mat(2 * d_inner, n_embd))
        w.add_tensor(p + "ssm_conv1d.weight", mat(d_inner, d_conv))
        w.add_tensor(p + "ssm_conv1d.bias", np.zeros(d_inner, np.float32))
        w.add_tensor(p + "ssm_x.weight", mat(dt_rank + 2 * d_state, d_inner))
        w.add_tensor(p + "ssm_dt.weight", mat(d_inner, dt_rank))
        w.add_tensor(p + "ssm_dt.bias", np.zeros(d_inner, np.float32))
        w.add_tensor(p + "ssm_a", -np.ones((d_inner, d_state), np.float32))
        w.add_tensor(p + "ssm_d", np.ones(d_inner, np.float32))
        w.add_tensor(p + "ssm_out.weight", mat(n_embd, d_inner))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("output.weight", mat(len(tokens), n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_prefix_reuse_is_refused_for_a_recurrent_model_and_said_why(tmp_path, tiny_model, ctx):
    assert reuse_refused(tiny_model) is None
    lb.complete(ctx, "hello world hello", max_tokens=2)
    assert lb.complete(ctx, "hello world hello world", max_tokens=2).usage.cached_tokens > 0
    with lb.Model(write_tiny_mamba(tmp_path / "mamba.gguf")) as m, lb.Context(m, n_ctx=128, n_threads=2) as c:
        assert m.is_recurrent and "recurrent" in reuse_refused(m)
        first = lb.complete(c, "hello world hello", max_tokens=4, ignore_eog=True)
        again = lb.complete(c, "hello world hello world", max_tokens=4, ignore_eog=True)
        assert first.usage.completion_tokens == 4 and again.usage.cached_tokens == 0


def test_wrong_kinds_of_new_arguments_are_invalid_input(tiny_model):
    """A callback that is not callable, limits that are not GrammarLimits: InvalidInputError, not a
    TypeError from deep inside; the context stays usable."""
    from llamabind import gbnf

    with lb.Context(tiny_model, n_ctx=256) as ctx:
        with pytest.raises(lb.InvalidInputError, match="on_token"):
            lb.complete(ctx, "hi", max_tokens=2, on_token=5)
        with pytest.raises(lb.InvalidInputError, match="GrammarLimits"):
            gbnf.check_grammar('root ::= "a"', "x")  # type: ignore[arg-type]
        assert lb.complete(ctx, "hi", max_tokens=2, ignore_eog=True).finish_reason == "length"
