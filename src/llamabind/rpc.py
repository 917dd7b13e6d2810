"""llama.cpp's RPC backend: ggml devices of other processes or machines, served by ``rpc-server``.

``Model(path, rpc_servers=["host:port", ...], n_gpu_layers=-1)`` offloads layers to them (as
llama.cpp's ``--rpc``). ggml-rpc aborts the process on an endpoint it cannot reach and waits
forever on one that never answers, so every endpoint is checked here first: a TCP connection
and the RPC hello, each within ``timeout`` seconds. A server lost later (it dies, or its host
vanishes: TCP keepalive) no longer aborts the process (``vendor/patches/ggml-rpc-lost-server.patch``):
the decode that meets it, and every later one, raises RpcServerLostError.

``llamabind-rpc-server`` (``serve``) runs the ``ggml-rpc-server`` shipped in ``+rpc`` builds.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import sys
import threading
from collections import Counter
from typing import Any, NoReturn, Sequence

from ._handle import Handle
from .errors import InvalidInputError, ModelLoadError, RpcServerLostError
from .raw import ffi, lib

# ggml-rpc.h: the protocol this build speaks (tests/test_rpc.py checks them against the header).
PROTO_MAJOR, PROTO_MINOR = 7, 0
_CMD_HELLO = 14  # static_assert(RPC_CMD_HELLO == 14) in ggml-rpc.cpp
_CAPS_SIZE = 24  # RPC_CONN_CAPS_SIZE in ggml-rpc/transport.h
SERVER_BINARY = "ggml-rpc-server"

_lock = threading.Lock()
_in_use: Counter[str] = Counter()  # endpoints a live model of this process is connected to


def supported() -> bool:
    """Whether this build has ggml's RPC backend (``-C accelerator=<backend>+rpc``)."""
    return bool(lib.llama_supports_rpc())


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split ``host:port`` as ggml-rpc does (the last colon); InvalidInputError if malformed."""
    if not isinstance(endpoint, str) or endpoint.count(":") != 1:
        raise InvalidInputError(f"RPC endpoint {endpoint!r} is not 'host:port'")
    host, _, port_text = endpoint.partition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidInputError(f"RPC endpoint {endpoint!r} is not 'host:port' with a port in 1-65535")
    return host, int(port_text)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data


def check_endpoint(endpoint: str, timeout: float = 5.0) -> tuple[int, int, int]:
    """Connect to ``endpoint`` and exchange the RPC hello within ``timeout`` seconds each.

    Returns the server's protocol version; raises ModelLoadError naming the endpoint and the cause
    (refused, unreachable, no reply: rpc-server serves one client at a time, or an incompatible version).
    """
    host, port = parse_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack("<BQ", _CMD_HELLO, _CAPS_SIZE) + bytes(_CAPS_SIZE))
            (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
            if size != 4 + _CAPS_SIZE:
                raise ConnectionError(f"an unexpected hello reply of {size} bytes (not a ggml rpc-server?)")
            major, minor, patch = _recv_exact(sock, size)[:3]
    except socket.timeout:
        raise ModelLoadError(f"RPC server {endpoint}: no reply within {timeout:g} s (down, unreachable, or "
                             f"busy: an rpc-server serves one client at a time)") from None
    except OSError as e:  # refused, unreachable, reset, name not resolved, closed early
        raise ModelLoadError(f"RPC server {endpoint}: {e.strerror or e}") from None
    if major != PROTO_MAJOR or minor > PROTO_MINOR:
        raise ModelLoadError(f"RPC server {endpoint} speaks protocol {major}.{minor}.{patch}; this build "
                             f"speaks {PROTO_MAJOR}.{PROTO_MINOR} (use the rpc-server of the same llamabind)")
    return major, minor, patch


@functools.cache
def _server_lost_fn() -> Any:
    """ggml_backend_rpc_server_lost (added by llamabind's patch), from the RPC backend's proc table."""
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if reg == ffi.NULL:
        raise ModelLoadError("this llamabind build has no RPC backend")
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_server_lost")
    if fn == ffi.NULL:
        raise ModelLoadError("ggml's RPC backend lacks ggml_backend_rpc_server_lost (an unpatched llama.cpp)")
    return ffi.cast("bool (*)(const char *)", fn)


def server_lost(endpoint: str) -> bool:
    """Whether ggml-rpc lost the server at ``endpoint`` while this process was connected to it."""
    parse_endpoint(endpoint)
    return bool(_server_lost_fn()(endpoint.encode()))


class RpcDevices(Handle):
    """The RPC devices a model was loaded with; holds their endpoints as in use while the model lives."""

    __slots__ = ("endpoints", "array")

    def __init__(self, endpoints: list[str], devices: list[Any]) -> None:
        self.endpoints = endpoints
        self.array = ffi.new("ggml_backend_dev_t[]", [*devices, ffi.NULL])  # NULL-terminated
        with _lock:
            _in_use.update(endpoints)
        super().__init__(self.array, _release_endpoints_of(endpoints))

    def lost(self) -> list[str]:
        """The endpoints of this model whose server was lost (a C call each)."""
        return [e for e in self.endpoints if server_lost(e)]

    def check(self) -> None:
        """Raise RpcServerLostError if a server of this model was lost."""
        lost = self.lost()
        if lost:
            raise RpcServerLostError(f"RPC server {', '.join(lost)} was lost (it died, or its host stopped "
                                     f"answering): close this model and its contexts, and load it again", lost)


def _release_endpoints_of(endpoints: list[str]):
    def release(_ptr: Any) -> None:
        with _lock:
            _in_use.subtract(endpoints)
    return release


def _add_server(endpoint: str) -> Any:
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server") if reg != ffi.NULL else ffi.NULL
    if fn == ffi.NULL:
        raise ModelLoadError("ggml's RPC backend is not loaded")
    added = ffi.cast("ggml_backend_reg_t (*)(const char *)", fn)(endpoint.encode())
    if added == ffi.NULL:
        why = "was lost right after the check" if server_lost(endpoint) else "offers no devices"
        raise ModelLoadError(f"RPC server {endpoint} {why}")
    return added


def local_offload_devices() -> list[Any]:
    """The local devices llama.cpp offloads to by default: GPUs, else integrated GPUs (no CPU)."""
    gpus: list[Any] = []
    igpus: list[tuple[Any, bytes]] = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        name = ffi.string(lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)))
        if kind == lib.GGML_BACKEND_DEVICE_TYPE_GPU and name != b"RPC":
            gpus.append(dev)
        elif kind == lib.GGML_BACKEND_DEVICE_TYPE_IGPU and (not igpus or name == igpus[-1][1]):
            igpus.append((dev, name))
    return gpus or [d for d, _ in igpus]


def devices(endpoints: Sequence[str], timeout: float = 5.0) -> RpcDevices:
    """Check each endpoint, add it to ggml-rpc and return the devices to load a model with:
    the RPC devices first, then the local GPUs (llama.cpp's own order for ``--rpc``)."""
    if isinstance(endpoints, str) or not endpoints:
        raise InvalidInputError("rpc_servers must be a non-empty list of 'host:port' strings")
    endpoints = list(endpoints)
    if len(set(endpoints)) != len(endpoints):
        raise InvalidInputError(f"rpc_servers lists an endpoint twice: {endpoints}")
    if not supported():
        raise ModelLoadError("this llamabind build has no RPC backend: install llamabind-rpc "
                             "or build with -C accelerator=<backend>+rpc")
    found = []
    for endpoint in endpoints:
        with _lock:
            ours = _in_use[endpoint] > 0
        if ours and server_lost(endpoint):
            raise ModelLoadError(f"RPC server {endpoint} was lost while a model of this process was loaded on "
                                 f"it: close that model and its contexts first")
        if not ours:  # a connection this process holds keeps the single-client server busy
            check_endpoint(endpoint, timeout)
        reg = _add_server(endpoint)
        found += [lib.ggml_backend_reg_dev_get(reg, i) for i in range(lib.ggml_backend_reg_dev_count(reg))]
    return RpcDevices(endpoints, found + local_offload_devices())


def server_path() -> str:
    """The ``ggml-rpc-server`` executable shipped next to this package (``+rpc`` builds)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), SERVER_BINARY)


def serve(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point ``llamabind-rpc-server``: exec ``ggml-rpc-server`` with the same arguments
    (``-H 127.0.0.1 -p 50052 -t N -d DEV -c``; ``--help`` lists them)."""
    path = server_path()
    if not os.path.isfile(path):
        print("llamabind-rpc-server: this llamabind build has no RPC backend (install llamabind-rpc "
              "or build with -C accelerator=<backend>+rpc)", file=sys.stderr)
        raise SystemExit(2)
    args = list(sys.argv[1:] if argv is None else argv)
    os.execv(path, [path, *args])
