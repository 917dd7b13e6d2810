"""Samplers (``llama_sampler``): every built-in kind, chains, and samplers written in Python."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ._gate import Gate
from ._handle import Handle
from .gbnf import GrammarLimits, check_grammar, nesting
from .raw import clear_errors, fail, ffi, lib, reason
from .errors import InvalidInputError

if TYPE_CHECKING:
    from .context import Context
    from .vocab import Vocab

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def _int32(v: int, name: str) -> int:
    """``v`` for a C int32 parameter (cffi would raise OverflowError past it)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not -2**31 <= v < 2**31:
        raise InvalidInputError(f"{name} must be an int in the int32 range, not {v!r}")
    return int(v)


def _seed(seed: int | None) -> int:
    return DEFAULT_SEED if seed is None else int(seed) & 0xFFFFFFFF


class _Err(threading.local):
    """A per-thread buffer for the reason the shim reports."""

    def __init__(self) -> None:
        self.buf = ffi.new("char[512]")

    def text(self) -> str:
        return ffi.string(self.buf).decode("utf-8", "replace")


_err = _Err()


class Sampler(Handle):
    """One llama.cpp sampler. Build it with the class methods; combine with ``Sampler.chain``.

    A sampler added to a chain is owned by the chain from then on (closing the chain frees it).
    Sampling, accepting and applying go through llamabind's shim: a sampler that selects no
    token, a token a grammar rejects, or a C++ exception inside llama.cpp becomes
    InvalidInputError. After a grammar failed that way the sampler refuses work until ``reset()``.
    """

    def __init__(self, ptr, what: str = "sampler", keep: Sequence[object] = (), vocab: "Vocab | None" = None,
                 error: str | None = None, n_vocab: int | None = None, py: Any = None) -> None:
        if ptr == ffi.NULL:
            raise InvalidInputError(f"could not create {what}: {error or reason('invalid parameters')}")
        # A sampler that reads a vocab is a child of its model: closing the model closes it first.
        super().__init__(ptr, lib.llama_sampler_free, parent=vocab.model if vocab is not None else None)
        self._keep = list(keep)  # Python objects the C sampler points into
        self._what = what
        self._vocab = vocab
        self._n_vocab = vocab.n_tokens if vocab is not None else n_vocab  # where the sampler knows it
        # Where the grammars are: () is this sampler, (i, ...) member i of this chain (and so on down).
        self._grammar_paths: list[tuple[int, ...]] = [()] if what in ("grammar", "lazy grammar") else []
        self._py: list[Any] = [py] if py is not None else []  # PySamplers inside, whose errors are raised
        self._failed: str | None = None
        self._gate = Gate("this sampler")  # one user at a time; close waits for a running sample
        self._owner: object = None  # the engine request that owns it, if any (see ``take``)
        # Pure greedy (alone or as the only member of a chain): the arg-max of the logits, taken
        # without building llama.cpp's candidate array (about 1 ms per token for 262k tokens).
        self._greedy = what == "greedy"
        # A chain that starts with a grammar: the rest picks and the grammar checks (see sample_fast).
        self._checked = False

    # -- built-in samplers ------------------------------------------------------------------
    @classmethod
    def greedy(cls) -> "Sampler":
        """Always the most likely token."""
        return cls(lib.llama_sampler_init_greedy(), "greedy")

    @classmethod
    def dist(cls, seed: int | None = None) -> "Sampler":
        """Draw from the distribution (seed None: random)."""
        return cls(lib.llama_sampler_init_dist(_seed(seed)), "dist")

    @classmethod
    def top_k(cls, k: int) -> "Sampler":
        return cls(lib.llama_sampler_init_top_k(_int32(k, "top_k")), "top_k")

    @classmethod
    def top_p(cls, p: float, min_keep: int = 1) -> "Sampler":
        return cls(lib.llama_sampler_init_top_p(p, min_keep), "top_p")

    @classmethod
    def min_p(cls, p: float, min_keep: int = 1) -> "Sampler":
        return cls(lib.llama_sampler_init_min_p(p, min_keep), "min_p")

    @classmethod
    def typical(cls, p: float, min_keep: int = 1) -> "Sampler":
        return cls(lib.llama_sampler_init_typical(p, min_keep), "typical")

    @classmethod
    def temp(cls, t: float) -> "Sampler":
        return cls(lib.llama_sampler_init_temp(t), "temp")

    @classmethod
    def temp_ext(cls, t: float, delta: float, exponent: float) -> "Sampler":
        """Dynamic (entropy-based) temperature."""
        return cls(lib.llama_sampler_init_temp_ext(t, delta, exponent), "temp_ext")

    @classmethod
    def xtc(cls, p: float, t: float, min_keep: int = 1, seed: int | None = None) -> "Sampler":
        return cls(lib.llama_sampler_init_xtc(p, t, min_keep, _seed(seed)), "xtc")

    @classmethod
    def top_n_sigma(cls, n: float) -> "Sampler":
        return cls(lib.llama_sampler_init_top_n_sigma(n), "top_n_sigma")

    @classmethod
    def mirostat(cls, n_vocab: int, seed: int | None = None, tau: float = 5.0, eta: float = 0.1,
                 m: int = 100) -> "Sampler":
        return cls(lib.llama_sampler_init_mirostat(n_vocab, _seed(seed), tau, eta, m), "mirostat")

    @classmethod
    def mirostat_v2(cls, seed: int | None = None, tau: float = 5.0, eta: float = 0.1) -> "Sampler":
        return cls(lib.llama_sampler_init_mirostat_v2(_seed(seed), tau, eta), "mirostat_v2")

    @classmethod
    def adaptive_p(cls, target: float, decay: float, seed: int | None = None) -> "Sampler":
        return cls(lib.llama_sampler_init_adaptive_p(target, decay, _seed(seed)), "adaptive_p")

    @classmethod
    def grammar(cls, vocab: "Vocab", grammar: str, root: str = "root", *,
                limits: GrammarLimits | None = None) -> "Sampler":
        """Constrain output to a GBNF grammar; a malformed grammar, or one past ``limits``
        (size, rules, alternatives: see ``gbnf.check_grammar``), raises InvalidInputError."""
        return cls._grammar(vocab, grammar, root, False, (), (), limits)

    @classmethod
    def grammar_lazy(cls, vocab: "Vocab", grammar: str, root: str = "root",
                     trigger_patterns: Iterable[str] = (), trigger_tokens: Iterable[int] = (), *,
                     limits: GrammarLimits | None = None) -> "Sampler":
        """A grammar that applies only once a trigger pattern (a regular expression) or token appears."""
        return cls._grammar(vocab, grammar, root, True, trigger_patterns, trigger_tokens, limits)

    @classmethod
    def _grammar(cls, vocab: "Vocab", grammar: str, root: str, lazy: bool, trigger_patterns: Iterable[str],
                 trigger_tokens: Iterable[int], limits: GrammarLimits | None) -> "Sampler":
        if not isinstance(grammar, str) or not grammar.strip() or "\0" in grammar:
            raise InvalidInputError("grammar must be a non-empty GBNF string")
        if not isinstance(root, str) or not root or "\0" in root:
            raise InvalidInputError("grammar root must be a non-empty rule name")
        patterns = list(trigger_patterns)
        if not all(isinstance(p, str) and "\0" not in p for p in patterns):
            raise InvalidInputError("trigger patterns must be strings")
        check_grammar(grammar, limits)  # also bounds nesting: llama.cpp's parser recurses per level
        for p in patterns:  # as std::regex does
            if nesting(p) > 200:
                raise InvalidInputError("trigger pattern nests deeper than 200 levels")
        pats = [ffi.new("char[]", p.encode()) for p in patterns]
        toks = np.ascontiguousarray(list(trigger_tokens), dtype=np.int32)
        vocab.check_tokens(toks)
        clear_errors()
        ptr = lib.llamabind_sampler_init_grammar(
            vocab.ptr, grammar.encode(), root.encode(), lazy, ffi.new("const char *[]", pats) if pats else ffi.NULL,
            len(pats), ffi.from_buffer("llama_token[]", toks) if toks.size else ffi.NULL, toks.size,
            _err.buf, 512)
        logged = reason("") if ptr == ffi.NULL else ""
        error = None if ptr != ffi.NULL else _err.text() + (f" ({logged})" if logged else "")
        return cls(ptr, "lazy grammar" if lazy else "grammar", vocab=vocab, error=error)

    @classmethod
    def penalties(cls, last_n: int = 64, repeat: float = 1.0, frequency: float = 0.0,
                  presence: float = 0.0) -> "Sampler":
        """Repetition, frequency and presence penalties over the last ``last_n`` tokens."""
        if repeat <= 0:
            raise InvalidInputError("repeat penalty must be > 0 (1.0 disables it)")
        return cls(lib.llama_sampler_init_penalties(0, _int32(last_n, "last_n"), repeat, frequency, presence),
                   "penalties")

    @classmethod
    def dry(cls, vocab: "Vocab", n_ctx_train: int, multiplier: float = 0.8, base: float = 1.75,
            allowed_length: int = 2, penalty_last_n: int = -1,
            breakers: Iterable[str] = ("\n", ":", '"', "*")) -> "Sampler":
        """DRY ("don't repeat yourself") penalty."""
        brk = [ffi.new("char[]", b.encode()) for b in breakers]
        arr = ffi.new("const char *[]", brk) if brk else ffi.NULL
        ptr = lib.llama_sampler_init_dry(vocab.ptr, multiplier, base, allowed_length, penalty_last_n, arr, len(brk))
        return cls(ptr, "dry", vocab=vocab)

    @classmethod
    def logit_bias(cls, n_vocab: int, bias: Mapping[int, float]) -> "Sampler":
        """Add ``bias[token]`` to the logits of those tokens (use -inf to ban one)."""
        items = list(bias.items())
        for tok, _ in items:
            if not 0 <= tok < n_vocab:
                raise InvalidInputError(f"logit bias token {tok} out of range [0, {n_vocab})")
        arr = ffi.new("llama_logit_bias[]", [{"token": t, "bias": b} for t, b in items] or 1)
        return cls(lib.llama_sampler_init_logit_bias(n_vocab, len(items), arr), "logit_bias", n_vocab=n_vocab)

    @classmethod
    def infill(cls, vocab: "Vocab") -> "Sampler":
        """Fill-in-the-middle helper sampler (after top-k/top-p); the vocab needs an EOT or EOS token."""
        if vocab.eot is None and vocab.eos is None:
            raise InvalidInputError("the infill sampler needs a vocabulary with an EOT or EOS token")
        return cls(lib.llama_sampler_init_infill(vocab.ptr), "infill", vocab=vocab)

    @classmethod
    def chain(cls, *samplers: "Sampler", no_perf: bool = True) -> "Sampler":
        """A chain applying ``samplers`` in order; it takes ownership of them."""
        params = lib.llama_sampler_chain_default_params()
        params.no_perf = no_perf
        chain = cls(lib.llama_sampler_chain_init(params), "chain")
        for s in samplers:
            chain.add(s)
        return chain

    @classmethod
    def from_params(cls, vocab: "Vocab", *, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                    min_p: float = 0.05, typical_p: float = 1.0, repeat_penalty: float = 1.0,
                    repeat_last_n: int = 64, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                    seed: int | None = None, grammar: str | None = None,
                    logit_bias: Mapping[int, float] | None = None) -> "Sampler":
        """The usual chain from the usual knobs; ``temperature`` <= 0 means greedy."""
        parts: list[Sampler] = []
        if grammar:  # first: then it only checks the token the rest picks (see sample_fast)
            parts.append(cls.grammar(vocab, grammar))
        if logit_bias:
            parts.append(cls.logit_bias(vocab.n_tokens, logit_bias))
        if repeat_penalty != 1.0 or frequency_penalty or presence_penalty:
            parts.append(cls.penalties(repeat_last_n, repeat_penalty, frequency_penalty, presence_penalty))
        if temperature <= 0:
            parts.append(cls.greedy())
        else:
            if top_k > 0:
                parts.append(cls.top_k(top_k))
            if typical_p < 1.0:
                parts.append(cls.typical(typical_p))
            if top_p < 1.0:
                parts.append(cls.top_p(top_p))
            if min_p > 0:
                parts.append(cls.min_p(min_p))
            parts.append(cls.temp(temperature))
            parts.append(cls.dist(seed))
        return cls.chain(*parts)

    # -- use ---------------------------------------------------------------------------------
    def add(self, sampler: "Sampler") -> None:
        """Append ``sampler`` to this chain (ownership moves to the chain)."""
        if self._what != "chain":
            raise InvalidInputError(f"add() needs a chain sampler, not {self._what}")
        if sampler is self:
            raise InvalidInputError("a chain cannot contain itself")
        if sampler._owner is not None:
            raise InvalidInputError("this sampler belongs to an engine request")
        with self._gate, sampler._gate:
            pos = len(self)
            lib.llama_sampler_chain_add(self.ptr, sampler.ptr)
            self._keep.append(sampler._keep)
            self._grammar_paths += [(pos, *p) for p in sampler._grammar_paths]
            self._py += sampler._py
            if sampler._vocab is not None and self._vocab is None:
                self._vocab, self._n_vocab = sampler._vocab, sampler._n_vocab
                sampler._vocab.model.adopt(self)
            self._greedy = pos == 0 and sampler._greedy
            self._checked = pos > 0 and (0,) in self._grammar_paths
            sampler._detach()

    def __len__(self) -> int:
        """Number of samplers in a chain (TypeError for a single sampler)."""
        if self._what != "chain":
            raise TypeError(f"a {self._what} sampler is not a chain and has no length")
        return max(lib.llama_sampler_chain_n(self.ptr), 0)

    def __bool__(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return ffi.string(lib.llama_sampler_name(self.ptr)).decode()

    @property
    def seed(self) -> int:
        return lib.llama_sampler_get_seed(self.ptr)

    def sample(self, ctx: "Context", idx: int = -1) -> int:
        """Sample (and accept) a token from output row ``idx`` of the context's last decode."""
        with ctx.hold():
            ctx.check_output(idx)
            return sample_fast(self, ctx, idx)

    def take(self, owner: object) -> None:
        """Make ``owner`` (an engine request) the sampler's only user; InvalidInputError if it is
        closed, in a chain, or owned already."""
        with self._gate:
            if self._ptr is None:
                raise InvalidInputError("this sampler is closed (or was added to a chain)")
            if self._owner is not None and self._owner is not owner:
                raise InvalidInputError("this sampler already belongs to another engine request")
            self._owner = owner

    def _check_token_ids(self, ids: np.ndarray) -> None:
        bad = ids < 0 if self._n_vocab is None else (ids < 0) | (ids >= self._n_vocab)
        if bad.any():
            raise InvalidInputError(f"token id {int(ids[bad][0])} out of range for this sampler's vocabulary")

    def _usable(self) -> Any:
        ptr = self.ptr
        if self._failed is not None:
            raise InvalidInputError(f"this sampler failed earlier ({self._failed}); call reset() first")
        return ptr

    def _grammar_ptrs(self) -> list[Any]:
        out = []
        for path in self._grammar_paths:
            p = self.ptr
            for i in path:
                p = lib.llama_sampler_chain_get(p, i)
            out.append(p)
        return out

    @contextmanager
    def _inside(self) -> Iterator[Any]:
        """One call into llama.cpp: through the gate, marked as inside C (a Python sampler's
        callback calling back into this sampler is refused)."""
        gate = self._gate
        with gate:
            ptr = self._usable()
            gate.in_c = True
            try:
                yield ptr
            finally:
                gate.in_c = False

    def close(self) -> None:
        """Free the sampler; from another thread this waits for a running sample (BusyError from
        inside a Python sampler's own callback)."""
        if self._ptr is None:
            return
        self._gate.shut()
        super().close()

    def _raised(self, rc_failed: bool) -> None:
        """After a shim call: re-raise a Python sampler's exception, else turn a failure into InvalidInputError."""
        for py in self._py:
            if py._error is not None:
                error, py._error = py._error, None
                raise error
        if rc_failed:
            reason = _err.text()
            if self._grammar_paths:
                self._failed = reason
            raise InvalidInputError(f"{self._what} sampler: {reason}")

    def accept(self, token: int) -> None:
        """Tell the sampler a token was chosen (penalties, grammar and mirostat state).

        A token that a grammar in the sampler does not allow now (including an end-of-generation
        token before the grammar is complete) raises InvalidInputError and changes nothing.
        """
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < 2**31:
            raise InvalidInputError(f"token id {token!r} out of range")
        token = int(token)
        self._check_token_ids(np.array([token]))
        with self._inside() as ptr:
            if self._grammar_paths:
                one = np.array([(token, 0.0, 0.0)], dtype=TOKEN_DATA)
                arr = _token_array(one)
                for g in self._grammar_ptrs():
                    if lib.llamabind_sampler_apply(g, arr, _err.buf, 512) != 0:
                        self._raised(True)
                    if one["logit"][0] == -np.inf:
                        raise InvalidInputError(f"the grammar does not accept token {token} here")
            self._raised(lib.llamabind_sampler_accept(ptr, token, _err.buf, 512) != 0)

    def apply(self, candidates: np.ndarray) -> int:
        """Apply to a TOKEN_DATA array in place; returns the selected index (-1 if none)."""
        if not isinstance(candidates, np.ndarray) or candidates.dtype != TOKEN_DATA or not candidates.flags.c_contiguous:
            raise InvalidInputError("candidates must be a contiguous array of dtype sampler.TOKEN_DATA")
        if candidates.ndim != 1 or candidates.size == 0:
            raise InvalidInputError("candidates must be a non-empty one-dimensional array")
        if not candidates.flags.writeable:
            raise InvalidInputError("candidates must be writeable (the sampler edits them in place)")
        self._check_token_ids(candidates["id"])
        arr = _token_array(candidates)
        with self._inside() as ptr:
            self._raised(lib.llamabind_sampler_apply(ptr, arr, _err.buf, 512) != 0)
        return int(arr.selected)

    def reset(self) -> None:
        """Back to the initial state (a failed grammar starts over)."""
        with self._gate:
            lib.llama_sampler_reset(self.ptr)
            self._failed = None

    def clone(self) -> "Sampler":
        """An independent copy with the same state (not for chains holding Python samplers)."""
        if any(self._keep):
            raise InvalidInputError("samplers written in Python cannot be cloned")
        with self._inside() as ptr:
            twin = Sampler(lib.llama_sampler_clone(ptr), self._what, vocab=self._vocab, n_vocab=self._n_vocab)
        twin._grammar_paths, twin._greedy, twin._checked = list(self._grammar_paths), self._greedy, self._checked
        return twin


def _token_array(candidates: np.ndarray) -> Any:
    return ffi.new("llama_token_data_array *", {
        "data": ffi.cast("llama_token_data *", candidates.ctypes.data), "size": candidates.size,
        "selected": -1, "sorted": False})


def sample_fast(sampler: Sampler, ctx: "Context", idx: int) -> int:
    """Sample and accept a token from output row ``idx`` of ``ctx`` (whose gate the caller is in).

    Greedy samplers over large vocabularies are a numpy arg-max over the logits (the first
    maximum, as llama.cpp's); the rest go through the shim's checked llama_sampler_sample, with
    the context marked as inside C (a Python sampler calling back into it is refused). A chain
    that starts with a grammar samples as llama-server does: the rest of the chain picks, the
    grammar checks that one token, and only a rejected token costs a pass over every candidate.
    """
    cptr, n_vocab = ctx.ptr, ctx.n_vocab
    if sampler._greedy and n_vocab >= 16384:
        p = lib.llama_get_logits_ith(cptr, idx)
        if p == ffi.NULL:
            fail(InvalidInputError, f"no logits for batch row {idx}")
        return int(np.argmax(np.frombuffer(ffi.buffer(p, 4 * n_vocab), dtype=np.float32)))
    gate, own = ctx._gate, sampler._gate
    own.enter()
    try:
        ptr = sampler._usable()
        gate.in_c = own.in_c = True
        try:
            tok = (lib.llamabind_sampler_sample_checked if sampler._checked else lib.llamabind_sampler_sample)(
                ptr, cptr, idx, _err.buf, 512)
        finally:
            gate.in_c = own.in_c = False
        if tok < 0:
            clear_errors()
            sampler._raised(True)
        elif sampler._py:
            sampler._raised(False)  # a Python sampler's exception, kept while llama.cpp ran
    finally:
        own.exit()
    return tok
