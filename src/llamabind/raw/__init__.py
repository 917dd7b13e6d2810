"""The raw floor, unsafe by design (like pyca/cryptography's hazmat): ``ffi`` and ``lib`` over
llama.h, mtmd.h, mtmd-helper.h and llamabind's C++ shim, the bridge from llama.cpp's log to the
Python logger ``llamabind``, and the one translator of llama.cpp failures into exceptions.

Nothing here checks arguments: a wrong call can crash the interpreter. The classes one floor
up (Model, Context, Sampler, ...) are the safe API.
"""

from ._binding import ffi, lib, logger
from ._translate import check_decode, clear_errors, fail, reason, take_text

__all__ = ["ffi", "lib", "logger", "check_decode", "clear_errors", "fail", "reason", "take_text"]
