"""The model's vocabulary: tokenize, detokenize, special tokens, incremental UTF-8-safe decoding."""

from __future__ import annotations

from codecs import utf_8_decode as _utf8_decode
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .raw import ffi, lib
from .errors import ClosedError, InvalidInputError

if TYPE_CHECKING:
    from .model import Model

TOKEN_NULL = -1
_SPECIALS = ("bos", "eos", "eot", "sep", "nl", "pad", "mask", "fim_pre", "fim_suf", "fim_mid")


def _token_or_none(tok: int) -> int | None:
    return None if tok == TOKEN_NULL else int(tok)


def as_tokens(tokens: Iterable[int] | np.ndarray) -> np.ndarray:
    """Tokens as a contiguous int32 array (no copy when they already are one)."""
    if isinstance(tokens, np.ndarray) and tokens.dtype == np.int32:
        arr = np.ascontiguousarray(tokens)
    else:
        try:
            arr = np.asarray(tokens)
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise InvalidInputError(f"token ids must be integers, not {arr.dtype}")
            if arr.size and (int(arr.min()) < -2**31 or int(arr.max()) >= 2**31):
                raise InvalidInputError("token id out of the int32 range")
            arr = np.ascontiguousarray(arr, dtype=np.int32)
        except (OverflowError, TypeError, ValueError) as e:
            raise InvalidInputError(f"not a list of token ids: {e}") from None
    if arr.ndim != 1:
        raise InvalidInputError(f"tokens must be one-dimensional, got shape {arr.shape}")
    return arr


def _encode(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        return text
    if not isinstance(text, str):
        raise InvalidInputError(f"text must be str or bytes, not {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(f"text is not valid UTF-8 (lone surrogate at index {e.start})") from None


class Vocab:
    """The vocabulary of a loaded model (``model.vocab``); valid while the model is open."""

    def __init__(self, model: "Model") -> None:
        self._model = model  # keeps the model alive while the vocab is in use
        self._vptr = lib.llama_model_get_vocab(model.ptr)
        self.n_tokens: int = lib.llama_vocab_n_tokens(self._vptr)
        self._pieces = model._pieces  # token pieces never change: one cache per model
        self._texts = model._texts
        v = self._vptr  # facts read once, while the model is surely open
        f = self._facts = {name: _token_or_none(getattr(lib, f"llama_vocab_{name}")(v)) for name in _SPECIALS}
        f.update(type=lib.llama_vocab_type(v), add_bos=bool(lib.llama_vocab_get_add_bos(v)),
                 add_eos=bool(lib.llama_vocab_get_add_eos(v)))
        # llama.cpp asserts (aborts) when asked to add a BOS/SEP the vocab does not have.
        wpm = f["type"] == lib.LLAMA_VOCAB_TYPE_WPM
        self._can_add_special = not (((wpm or f["add_bos"]) and f["bos"] is None) or (wpm and f["sep"] is None))

    @property
    def model(self) -> "Model":
        return self._model

    @property
    def ptr(self):
        """The raw ``const llama_vocab *``; raises ClosedError once the model is closed."""
        if self._model.closed:
            raise ClosedError("the model of this vocab is closed")
        return self._vptr

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def type(self) -> int:
        return self._fact("type")

    def _fact(self, name: str) -> Any:
        self.ptr  # ClosedError once the model is closed
        return self._facts[name]

    def starts_with_bos(self, text: str) -> bool:
        """Whether ``text`` (a rendered chat template, say) already begins with the BOS token's text,
        so tokenizing it must not add another."""
        bos = self.bos
        return bos is not None and text.startswith(self.text(bos))

    def check_token(self, token: int) -> int:
        """``token`` as an int, or InvalidInputError unless it is in [0, n_tokens)."""
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise InvalidInputError(f"token id must be an int, not {type(token).__name__}")
        if not 0 <= token < self.n_tokens:
            raise InvalidInputError(f"token id {token} out of range [0, {self.n_tokens})")
        return int(token)

    def check_tokens(self, tokens: np.ndarray) -> None:
        """Raise InvalidInputError if any token id is outside [0, n_tokens)."""
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.n_tokens):
            bad = tokens[(tokens < 0) | (tokens >= self.n_tokens)][0]
            raise InvalidInputError(f"token id {int(bad)} out of range [0, {self.n_tokens})")

    def tokenize(self, text: str | bytes, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        """Tokenize UTF-8 text into an int32 array of token ids."""
        data = _encode(text)
        if add_special and not self._can_add_special:
            raise InvalidInputError("this vocabulary lacks the BOS/SEP tokens it would add: use add_special=False")
        if len(data) >= 2**31 - 16:
            raise InvalidInputError("text too long to tokenize")
        out = np.empty(len(data) + 8, dtype=np.int32)
        with self._model.hold():
            vptr = self.ptr
            n = lib.llama_tokenize(vptr, data, len(data), ffi.from_buffer("llama_token[]", out), len(out),
                                   add_special, parse_special)
            if n < 0:
                if n == np.iinfo(np.int32).min:
                    raise InvalidInputError("text too long to tokenize")
                out = np.empty(-n, dtype=np.int32)
                n = lib.llama_tokenize(vptr, data, len(data), ffi.from_buffer("llama_token[]", out), len(out),
                                       add_special, parse_special)
        return out[:n]

    def detokenize(self, tokens: Iterable[int] | np.ndarray, remove_special: bool = False,
                   unparse_special: bool = False) -> str:
        """Text of ``tokens``; bytes that are not valid UTF-8 become U+FFFD."""
        return self.detokenize_bytes(tokens, remove_special, unparse_special).decode("utf-8", "replace")

    def detokenize_bytes(self, tokens: Iterable[int] | np.ndarray, remove_special: bool = False,
                         unparse_special: bool = False) -> bytes:
        """Raw bytes of ``tokens`` (may end inside a multi-byte character)."""
        arr = as_tokens(tokens)
        self.check_tokens(arr)
        size = max(16, arr.size * 8)
        for _ in range(2):
            buf = ffi.new("char[]", size)
            with self._model.hold():
                n = lib.llama_detokenize(self.ptr, ffi.from_buffer("llama_token[]", arr), arr.size, buf, size,
                                         remove_special, unparse_special)
            if n >= 0:
                return ffi.unpack(buf, n)
            size = -n
        raise InvalidInputError("detokenize: buffer size negotiation failed")

    def token_to_piece(self, token: int, special: bool = True) -> bytes:
        """The bytes of one token (special tokens rendered as text when ``special``)."""
        token = self.check_token(token)
        buf = ffi.new("char[]", 256)  # per call: a Vocab is shared by threads
        with self._model.hold():
            n = lib.llama_token_to_piece(self.ptr, token, buf, 256, 0, special)
            if n < 0:
                buf = ffi.new("char[]", -n)
                n = lib.llama_token_to_piece(self._vptr, token, buf, -n, 0, special)
        return ffi.unpack(buf, n)

    def text(self, token: int) -> str:
        """The token's text as stored in the vocabulary."""
        token = self.check_token(token)
        with self._model.hold():
            return ffi.string(lib.llama_vocab_get_text(self.ptr, token)).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (eos, eot, ...)."""
        token = self.check_token(token)
        with self._model.hold():
            return bool(lib.llama_vocab_is_eog(self.ptr, token))

    def is_control(self, token: int) -> bool:
        token = self.check_token(token)
        with self._model.hold():
            return bool(lib.llama_vocab_is_control(self.ptr, token))

    bos = property(lambda self: self._fact("bos"), doc="beginning-of-sequence token or None")
    eos = property(lambda self: self._fact("eos"), doc="end-of-sequence token or None")
    eot = property(lambda self: self._fact("eot"), doc="end-of-turn token or None")
    sep = property(lambda self: self._fact("sep"), doc="separator token or None")
    nl = property(lambda self: self._fact("nl"), doc="newline token or None")
    pad = property(lambda self: self._fact("pad"), doc="padding token or None")
    mask = property(lambda self: self._fact("mask"), doc="mask token or None")
    fim_pre = property(lambda self: self._fact("fim_pre"), doc="FIM prefix token or None")
    fim_suf = property(lambda self: self._fact("fim_suf"), doc="FIM suffix token or None")
    fim_mid = property(lambda self: self._fact("fim_mid"), doc="FIM middle token or None")
    add_bos = property(lambda self: self._fact("add_bos"))
    add_eos = property(lambda self: self._fact("add_eos"))

    def _piece_entry(self, token: int, special: bool) -> tuple[bytes, bool]:
        """Compute and cache (piece bytes, is end-of-generation) for a token: pieces never change."""
        entry = (self.token_to_piece(token, special), self.is_eog(token))
        self._pieces[special][token] = entry
        return entry

    def detokenizer(self, special: bool = False, render: Iterable[int] = ()) -> "Detokenizer":
        """An incremental decoder that never splits a multi-byte character; the special tokens
        in ``render`` show as text even when ``special`` is off (a chat format's markers)."""
        return Detokenizer(self, special, render)


_UNSEEN = object()


class Detokenizer:
    """Turns tokens into text one at a time; incomplete UTF-8 sequences wait for the next token."""

    __slots__ = ("_vocab", "_special", "_pieces", "_texts", "_buf")

    def __init__(self, vocab: Vocab, special: bool = False, render: Iterable[int] = ()) -> None:
        self._vocab = vocab
        self._special = special
        self._pieces = vocab._pieces[special]
        shown = [int(t) for t in render]
        if shown and not special:  # a private table: these tokens as text, the rest shared
            self._pieces = dict(self._pieces)
            for t in shown:
                vocab.check_token(t)
                self._pieces[t] = (vocab.token_to_piece(t, True), vocab.is_eog(t))
        self._texts = vocab._texts  # piece bytes -> text, for pieces that are whole UTF-8
        self._buf = b""             # the start of a character, waiting for the rest

    def feed_piece(self, piece: bytes) -> str:
        """Text completed by a token's bytes (from ``entry``): a whole-UTF-8 piece after whole
        characters is a dictionary lookup; the rest is decoded with what is pending, invalid
        bytes becoming U+FFFD."""
        if not self._buf:
            got = self._texts.get(piece, _UNSEEN)
            if got is _UNSEEN:
                try:
                    got = piece.decode("utf-8")
                except UnicodeDecodeError:
                    got = None  # part of a character, or invalid: remembered, never raised again
                self._texts[piece] = got
            if isinstance(got, str):
                return got
            data = piece
        else:
            data = self._buf + piece
        text, n = _utf8_decode(data, "replace", False)
        self._buf = data[n:]
        return text

    def entry(self, token: int) -> tuple[bytes, bool]:
        """(the token's bytes, whether it ends generation), from the model's cache."""
        e = self._pieces.get(token)
        if e is None:
            e = self._pieces[token] = self._vocab._piece_entry(token, self._special)
        return e

    def feed(self, token: int) -> str:
        """Text completed by ``token`` ("" while a character is still incomplete)."""
        return self.feed_piece(self.entry(token)[0])

    @property
    def pending(self) -> bool:
        """Whether the start of a character waits for the next token's bytes."""
        return bool(self._buf)

    def flush(self) -> str:
        """Whatever is left; an incomplete trailing character becomes U+FFFD."""
        text = _utf8_decode(self._buf, "replace", True)[0]
        self._buf = b""
        return text

    def reset(self) -> None:
        self._buf = b""
