"""Samplers written in Python: subclass PySampler, edit the candidates (a numpy array) in ``apply``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidInputError
from .raw import ffi, lib
from .sampler import TOKEN_DATA, Sampler


class TokenDataArray:
    """What a Python sampler sees: the candidate tokens as a numpy array of its own (a copy of
    llama.cpp's, written back when ``apply`` returns, so a kept array never reads freed memory),
    and the selection."""

    __slots__ = ("_c", "data")

    def __init__(self, c) -> None:
        self._c = c
        self.data = np.frombuffer(ffi.buffer(c.data, c.size * TOKEN_DATA.itemsize), dtype=TOKEN_DATA).copy()

    def _write_back(self) -> None:
        n = self._c.size
        data = self.data
        if not isinstance(data, np.ndarray) or data.dtype != TOKEN_DATA or data.size < n:
            raise InvalidInputError(f"cur.data must stay an array of {n} sampler.TOKEN_DATA candidates")
        ffi.memmove(self._c.data, np.ascontiguousarray(data[:n]), n * TOKEN_DATA.itemsize)

    @property
    def selected(self) -> int:
        return int(self._c.selected)

    @selected.setter
    def selected(self, i: int) -> None:
        if not -1 <= i < self._c.size:
            raise InvalidInputError(f"selected index {i} out of range")
        self._c.selected = i

    @property
    def sorted(self) -> bool:
        return bool(self._c.sorted)

    @sorted.setter
    def sorted(self, value: bool) -> None:
        self._c.sorted = value

    def _release(self) -> None:
        self._c = ffi.new("llama_token_data_array *")

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` candidates."""
        if not 1 <= n <= self._c.size:
            raise InvalidInputError(f"cannot truncate {self._c.size} candidates to {n}")
        self._c.size = n
        self.data = self.data[:n]


class PySampler:
    """Base class for samplers written in Python; ``as_sampler()`` makes a llama.cpp sampler.

    Override ``apply(cur)`` (required: edit ``cur.data`` logits in place, or set
    ``cur.selected``), and optionally ``accept(token)`` and ``reset()``. An exception raised
    inside never crosses into C: the candidates stay unchanged and the exception is raised
    to whoever sampled, once llama.cpp has returned.
    """

    name = "python"
    _error: BaseException | None = None

    def apply(self, cur: TokenDataArray) -> None:
        raise NotImplementedError

    def accept(self, token: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def _apply_once(self, smpl: Any, c: Any) -> None:
        cur = TokenDataArray(c)
        try:
            self.apply(cur)
            cur._write_back()  # only after a clean return: an exception leaves the candidates as they were
        finally:
            cur._release()  # the C array is gone after this call: a kept object changes nothing there

    def as_sampler(self) -> Sampler:
        def guard(fn):
            def call(*args):
                try:
                    fn(*args)
                except BaseException as e:  # raised to the caller once back in Python
                    if self._error is None:
                        self._error = e
            return call

        name = ffi.new("char[]", self.name.encode())
        slot = {n: f.type for n, f in ffi.typeof("struct llama_sampler_i").fields}
        cbs = {
            "name": ffi.callback(slot["name"], lambda s: name),
            "accept": ffi.callback(slot["accept"], guard(lambda s, t: self.accept(t))),
            "apply": ffi.callback(slot["apply"], guard(self._apply_once)),
            "reset": ffi.callback(slot["reset"], guard(lambda s: self.reset())),
            "free": ffi.callback(slot["free"], lambda s: None),
        }
        iface = ffi.new("struct llama_sampler_i *", cbs)
        handle = ffi.new_handle(self)
        return Sampler(lib.llama_sampler_init(iface, handle), "python sampler", keep=[self, name, cbs, iface, handle],
                       py=self)
