"""The decode loop against native llama.cpp and against itself (cache reuse, state, sequences)."""

from __future__ import annotations

import re
import subprocess
import threading

import numpy as np
import pytest

import llamabind as lb

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "Les trois couleurs du drapeau sont",
]


def native_simple(tool, model, prompt, n):
    out = subprocess.run([str(tool), "-m", str(model), "-n", str(n), "-ngl", "0", prompt],
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    return out.stdout


def ours(ctx, prompt, n):
    vocab = ctx.vocab
    done = lb.complete(ctx, prompt, max_tokens=n, reuse_cache=False)
    toks = vocab.tokenize(prompt, add_special=True, parse_special=True)
    pieces = b"".join(vocab.token_to_piece(int(t), special=True) for t in list(toks) + done.tokens)
    return pieces + b"\n", done


@pytest.mark.oracle
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_llama_simple_gemma(gemma_ctx, native_tool, gemma_path, prompt):
    expected = native_simple(native_tool("llama-simple"), gemma_path, prompt, 24)
    got, done = ours(gemma_ctx, prompt, 24)
    assert got == expected
    assert done.usage.completion_tokens > 0


@pytest.mark.oracle
@pytest.mark.parametrize("prompt", ["hello", "abc def", "x"])
def test_greedy_matches_llama_simple_tiny(tiny_model, native_tool, tiny_model_path, prompt):
    with lb.Context(tiny_model, n_ctx=256, n_threads=2) as ctx:
        got, _ = ours(ctx, prompt, 16)
    assert got == native_simple(native_tool("llama-simple"), tiny_model_path, prompt, 16)


def test_events_stream_and_finish(gemma_ctx):
    events = list(lb.generate(gemma_ctx, "Count: 1, 2, 3,", max_tokens=8))
    *tokens, done = events
    assert isinstance(done, lb.DoneEvent) and done.finish_reason == "length"
    assert all(isinstance(e, lb.TokenEvent) for e in tokens)
    assert done.usage.completion_tokens == 8 == len(done.tokens)
    assert "".join(e.text for e in tokens) == done.text
    assert done.timings.ttft_s > 0 and done.timings.generation_tps > 0 and done.timings.prompt_tps > 0


def test_stop_strings_are_never_leaked(gemma_ctx):
    full = lb.complete(gemma_ctx, "Count: 1, 2, 3,", max_tokens=16).text
    # stop on a string that straddles tokens: the text stops right before it
    stop = full[6:10]
    events = list(lb.generate(gemma_ctx, "Count: 1, 2, 3,", max_tokens=16, stop=[stop, "zzz-never"]))
    done = events[-1]
    assert done.finish_reason == "stop"
    streamed = "".join(e.text for e in events[:-1])
    assert streamed == done.text == full[: full.find(stop)]
    assert stop not in streamed


def test_stop_matcher_holds_back_prefixes():
    from llamabind.generation import StopMatcher

    m = StopMatcher(["</s>", "STOP"])
    assert m.push("hello <") == ("hello ", False)
    assert m.push("/") == ("", False)
    assert m.push("x") == ("</x", False)
    assert m.push("ST") == ("", False)
    assert m.push("OP and more") == ("", True)


def test_chat_messages_use_template(gemma_ctx):
    msgs = [{"role": "user", "content": "Say hello."}]
    text = gemma_ctx.model.apply_chat_template(msgs)
    assert "<start_of_turn>user" in text and text.rstrip().endswith("model")
    done = lb.complete(gemma_ctx, messages=msgs, max_tokens=16)
    assert done.finish_reason in ("stop", "length") and done.usage.prompt_tokens > 5
    msgs += [{"role": "assistant", "content": done.text}, {"role": "user", "content": "Again."}]
    second = lb.complete(gemma_ctx, messages=msgs, max_tokens=8)
    assert second.usage.cached_tokens > 5  # the first turn came from the KV cache


def test_seeded_sampling_is_reproducible(gemma_ctx):
    def run(seed):
        s = lb.Sampler.from_params(gemma_ctx.vocab, temperature=1.0, top_k=50, seed=seed)
        return lb.complete(gemma_ctx, "My favourite animal is", max_tokens=16, sampler=s, reuse_cache=False).tokens
    assert run(7) == run(7)
    assert run(7) != run(8) or run(7) != run(9)


def test_grammar_constrains_output(gemma_ctx):
    grammar = 'root ::= "yes" | "no" | digit digit\ndigit ::= [0-9]'
    s = lb.Sampler.from_params(gemma_ctx.vocab, temperature=0.9, seed=1, grammar=grammar)
    done = lb.complete(gemma_ctx, "Answer:", max_tokens=8, sampler=s)
    assert re.fullmatch(r"yes|no|[0-9]{2}", done.text), done.text
    assert done.finish_reason == "stop"


def test_state_save_and_restore_continues_exactly(gemma_ctx):
    prompt = "The quick brown fox"
    ref = lb.complete(gemma_ctx, prompt, max_tokens=12, reuse_cache=False).tokens
    lb.complete(gemma_ctx, prompt, max_tokens=1, reuse_cache=False)
    state = gemma_ctx.state_save()
    history = gemma_ctx.cached_tokens(0)
    gemma_ctx.memory.clear()
    lb.complete(gemma_ctx, "Something else entirely", max_tokens=3)
    gemma_ctx.state_load(state, tokens=history)
    resumed = lb.complete(gemma_ctx, prompt, max_tokens=12)
    assert resumed.usage.cached_tokens == len(history) - 1  # all but the re-decoded last token
    assert resumed.tokens == ref


def test_sequence_state_roundtrip(gemma_ctx):
    lb.complete(gemma_ctx, "Alpha beta gamma", max_tokens=2, reuse_cache=False)
    data = gemma_ctx.seq_state_save(0)
    assert len(data) > 1000
    pos = gemma_ctx.memory.seq_pos_max(0)
    gemma_ctx.memory.seq_rm(0)
    assert gemma_ctx.memory.seq_pos_max(0) == -1
    gemma_ctx.seq_state_load(data, 0)
    assert gemma_ctx.memory.seq_pos_max(0) == pos


def test_several_sequences_are_greedy_per_sequence(gemma_model):
    """N prompts decoded together: every token is the greedy choice of its own sequence.

    Batched matmuls are not bit-identical to single-token ones, so near-ties may break
    differently from a one-by-one run; each chosen token must still be the arg-max of a
    single-sequence recomputation, up to numerical noise.
    """
    prompts = PROMPTS[:3]
    with lb.Context(gemma_model, n_ctx=1024, n_seq_max=4, n_threads=2) as ctx:
        dones, streamed = {}, {i: [] for i in range(len(prompts))}
        for ev in lb.generate_many(ctx, prompts, max_tokens=10):
            if isinstance(ev, lb.DoneEvent):
                dones[ev.index] = ev
            elif ev.token is not None:
                streamed[ev.index].append(ev.token)
        v = ctx.vocab
        for i, p in enumerate(prompts):
            out = dones[i].tokens
            assert out == streamed[i] and len(out) == 10 and dones[i].finish_reason == "length"
            prompt = v.tokenize(p)
            seq = np.concatenate([prompt, np.asarray(out[:-1], np.int32)])
            ctx.memory.clear()
            b = lb.Batch(len(seq))
            b.add(seq, 0, 0, logits="all")
            ctx.decode(b)
            for k, tok in enumerate(out):
                row = ctx.logits(len(prompt) - 1 + k)
                assert row[tok] >= row.max() - 0.1, (i, k, tok, int(row.argmax()))
        first = [lb.complete(ctx, p, max_tokens=1, reuse_cache=False).tokens[0] for p in prompts]
        assert first == [dones[i].tokens[0] for i in range(3)]


def test_cancel_during_prefill_and_context_stays_usable(gemma_model):
    with lb.Context(gemma_model, n_ctx=2048, n_batch=2048, n_threads=2) as ctx:
        cancel = lb.Cancel()
        long_prompt = "word " * 1500
        cancel.set()  # set before the prefill: its first graph node aborts it
        done = list(lb.generate(ctx, long_prompt, max_tokens=4, cancel=cancel))[-1]
        assert done.finish_reason == "cancelled"
        assert ctx.cached_tokens(0) == [] or len(ctx.cached_tokens(0)) < 1500
        assert done.usage.completion_tokens == 0
        ok = lb.complete(ctx, "The capital of France is", max_tokens=4)
        assert ok.finish_reason == "length"


def test_closing_the_iterator_stops_and_frees_the_context(gemma_ctx):
    gen = lb.generate(gemma_ctx, "Once upon a time", max_tokens=50)
    next(gen)
    next(gen)
    gen.close()
    assert lb.complete(gemma_ctx, "Once upon a time", max_tokens=2).usage.cached_tokens > 0


def test_busy_context_is_refused(gemma_ctx):
    gen = lb.generate(gemma_ctx, "Hello", max_tokens=5)
    next(gen)
    with pytest.raises(lb.BusyError):
        next(lb.generate(gemma_ctx, "Hello", max_tokens=5))
    gen.close()


def test_two_contexts_in_two_threads(gemma_model):
    results = {}

    def work(i):
        with lb.Context(gemma_model, n_ctx=256, n_threads=1) as ctx:
            results[i] = lb.complete(ctx, PROMPTS[i], max_tokens=8).tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with lb.Context(gemma_model, n_ctx=256, n_threads=1) as ctx:
        assert results[0] == lb.complete(ctx, PROMPTS[0], max_tokens=8).tokens
        assert results[1] == lb.complete(ctx, PROMPTS[1], max_tokens=8).tokens


def test_generate_after_a_prefill_of_ones_own(gemma_ctx):
    """generate_after(prefill=...) runs the caller's decode inside the generation, then continues."""
    prompt = "The capital of France is"
    ref = lb.complete(gemma_ctx, prompt, max_tokens=8, reuse_cache=False).tokens
    toks = gemma_ctx.vocab.tokenize(prompt)

    def prefill():
        with pytest.raises(lb.BusyError):  # the context is held by this generation meanwhile
            next(lb.generate(gemma_ctx, "x"))
        gemma_ctx.memory.clear()
        b = lb.Batch(len(toks))
        b.add(toks, 0)
        gemma_ctx.decode(b)
        return len(toks)

    done = list(lb.generate_after(gemma_ctx, prefill=prefill, max_tokens=8))[-1]
    assert done.tokens == ref and done.usage.prompt_tokens == len(toks) and done.finish_reason == "length"
    with pytest.raises(lb.InvalidInputError):
        lb.generate_after(gemma_ctx)
