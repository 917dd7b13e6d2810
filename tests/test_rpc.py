"""llama.cpp's RPC backend (``+rpc`` builds): layers offloaded to two ``rpc-server`` processes on
127.0.0.1 give the same greedy tokens as a local run; dead, silent or malformed endpoints give a
clear ModelLoadError within a bounded time instead of ggml-rpc's abort or endless wait; a server
lost in the middle of a generation is an RpcServerLostError, and the process lives on."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

import llamabind as lb
from llamabind import _build_info, rpc

REPO = Path(__file__).resolve().parent.parent
FLAVOUR_HAS_RPC = "rpc" in _build_info.ACCELERATOR.split("+")


def _need_rpc() -> None:
    """Skip on flavours without RPC (visible reason); a +rpc flavour that lacks it fails."""
    missing = []
    if not rpc.supported():
        missing.append("llama_supports_rpc() is false")
    if not os.access(rpc.server_path(), os.X_OK):
        missing.append(f"{rpc.server_path()} is missing or not executable")
    if not missing:
        return
    if FLAVOUR_HAS_RPC:
        pytest.fail(f"accelerator {_build_info.ACCELERATOR} but " + "; ".join(missing))
    pytest.skip(f"accelerator {_build_info.ACCELERATOR} has no RPC backend (build with -C accelerator=cpu+rpc)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int = 1, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """One rpc-server on 127.0.0.1 (CPU device; a free port unless given), waited for with a bounded loop."""
    port = port or _free_port()
    proc = subprocess.Popen([rpc.server_path(), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    endpoint = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            rpc.check_endpoint(endpoint, timeout=2)
            return proc, endpoint
        except lb.ModelLoadError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"rpc-server on {endpoint} did not start: {proc.stderr.read().decode()[-500:]}")
            time.sleep(0.1)


@contextmanager
def fake_server(serve: Callable[[socket.socket], None] | None = None) -> Iterator[str]:
    """A listener on 127.0.0.1 that is no rpc-server: ``serve(listener)`` runs in a thread (None:
    it never answers). Yields its endpoint."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(20)
        t = threading.Thread(target=serve, args=(listener,)) if serve is not None else None
        if t is not None:
            t.start()
        try:
            yield "127.0.0.1:%d" % listener.getsockname()[1]
        finally:
            listener.close()
            if t is not None:
                t.join(20)


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=10)
    proc.stderr.close()


@pytest.fixture(scope="module")
def servers():
    _need_rpc()
    started = [start_server(), start_server()]
    yield [endpoint for _, endpoint in started]
    for proc, _ in started:
        stop(proc)


def greedy(model: lb.Model, prompt: str, n: int = 16) -> list[int]:
    with lb.Context(model, n_ctx=512, n_batch=512) as ctx:
        return [ev.token for ev in lb.generate(ctx, prompt, max_tokens=n, sampler=lb.Sampler.greedy(),
                                               ignore_eog=True)
                if isinstance(ev, lb.TokenEvent) and ev.token is not None]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def load_logged(path: str, **kw) -> tuple[lb.Model, str]:
    """Load a model with llama.cpp's log captured (to see where the layers went)."""
    log, handler = logging.getLogger("llamabind"), _Lines()
    old = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        return lb.Model(path, **kw), "\n".join(handler.lines)
    finally:
        log.removeHandler(handler)
        log.setLevel(old)


def test_protocol_constants_match_the_pinned_header():
    header = REPO / "vendor" / "llama.cpp" / "ggml" / "include" / "ggml-rpc.h"
    if not header.is_file():
        pytest.skip(f"{header} not extracted (python build_backend/vendor.py)")
    text = header.read_text()
    assert int(re.search(r"RPC_PROTO_MAJOR_VERSION\s+(\d+)", text).group(1)) == rpc.PROTO_MAJOR
    assert int(re.search(r"RPC_PROTO_MINOR_VERSION\s+(\d+)", text).group(1)) == rpc.PROTO_MINOR
    src = header.parent.parent / "src" / "ggml-rpc"
    assert "RPC_CMD_HELLO == 14" in (src / "ggml-rpc.cpp").read_text()
    assert f"RPC_CONN_CAPS_SIZE = {rpc._CAPS_SIZE};" in (src / "transport.h").read_text()


def test_entry_point_runs_the_shipped_server():
    _need_rpc()
    script = Path(sys.executable).parent / "llamabind-rpc-server"
    assert script.is_file(), f"{script}: the console script is not installed"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert "--port PORT" in out.stderr and "--host HOST" in out.stderr, out.stderr


@pytest.mark.parametrize("bad", ["localhost", "127.0.0.1:", ":50052", "127.0.0.1:0", "127.0.0.1:70000",
                                 "127.0.0.1:port", "[::1]:1:2"])
def test_malformed_endpoints_are_invalid_input(tiny_model_path, bad):
    _need_rpc()
    with pytest.raises(lb.InvalidInputError, match="host:port"):
        lb.Model(tiny_model_path, rpc_servers=[bad], n_gpu_layers=-1)


def test_endpoint_list_is_checked(tiny_model_path):
    _need_rpc()
    for bad in (None, 50052, "localhost"):
        with pytest.raises(lb.InvalidInputError):
            rpc.server_lost(bad)
    for bad in ([], "127.0.0.1:50052", ["127.0.0.1:50052", "127.0.0.1:50052"]):
        with pytest.raises(lb.InvalidInputError):
            lb.Model(tiny_model_path, rpc_servers=bad, n_gpu_layers=-1)


def test_refused_endpoint_fails_fast(tiny_model_path):
    _need_rpc()
    t0 = time.monotonic()
    with pytest.raises(lb.ModelLoadError, match=r"127\.0\.0\.1:\d+: Connection refused"):
        lb.Model(tiny_model_path, rpc_servers=[f"127.0.0.1:{_free_port()}"], n_gpu_layers=-1)
    assert time.monotonic() - t0 < 3


def test_silent_endpoint_times_out(tiny_model_path):
    """A listener that never answers (a hung server, or one busy with another client: rpc-server
    serves one at a time) would keep ggml-rpc waiting forever; the check gives up in time."""
    _need_rpc()
    with fake_server() as endpoint:
        t0 = time.monotonic()
        with pytest.raises(lb.ModelLoadError, match="no reply within 1 s"):
            lb.Model(tiny_model_path, rpc_servers=[endpoint], n_gpu_layers=-1, rpc_timeout=1.0)
        assert time.monotonic() - t0 < 3


def test_not_an_rpc_server(tiny_model_path):
    _need_rpc()

    def answer(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(64)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    with fake_server(answer) as endpoint:
        with pytest.raises(lb.ModelLoadError, match="not a ggml rpc-server"):
            lb.Model(tiny_model_path, rpc_servers=[endpoint], n_gpu_layers=-1, rpc_timeout=5.0)


def test_server_lost_between_check_and_connection(tiny_model_path):
    """A server that passes the check and is gone when ggml-rpc connects (it died in between):
    ggml-rpc would abort ("Failed to connect"); patched, the load is a ModelLoadError that says so."""
    _need_rpc()

    def hello_then_gone(listener: socket.socket) -> None:
        conn, _ = listener.accept()  # the check: a well-formed hello, then the server "dies"
        with conn:
            conn.recv(64)
            conn.sendall(struct.pack("<Q", 4 + rpc._CAPS_SIZE) + bytes([rpc.PROTO_MAJOR, rpc.PROTO_MINOR, 0, 0])
                         + bytes(rpc._CAPS_SIZE))
        for _ in range(8):  # ggml-rpc's own connections: closed at once
            try:
                conn, _ = listener.accept()
            except OSError:  # closed by fake_server, or no more connections
                return
            conn.close()

    with fake_server(hello_then_gone) as endpoint:
        with pytest.raises(lb.ModelLoadError, match="was lost"):
            lb.Model(tiny_model_path, rpc_servers=[endpoint], n_gpu_layers=-1)


def test_tiny_model_across_two_servers_matches_local(tiny_model_path, servers):
    with lb.Model(tiny_model_path) as local:
        want = greedy(local, "hello world")
    model, log = load_logged(tiny_model_path, rpc_servers=servers, n_gpu_layers=-1)
    with model:
        assert re.search(r"offloaded (\d+)/\1 layers to GPU", log), log[-2000:]
        for endpoint in servers:  # both servers hold part of the weights
            assert re.search(rf"RPC\d+\[{re.escape(endpoint)}\] model buffer size", log), log[-2000:]
        assert greedy(model, "hello world") == want
        assert len(want) == 16


def test_two_models_share_the_servers(tiny_model_path, servers):
    """A second model on endpoints this process already holds skips the check (the servers
    serve one client at a time, and that client is this process) and works."""
    with lb.Model(tiny_model_path, rpc_servers=servers, n_gpu_layers=-1) as a, \
            lb.Model(tiny_model_path, rpc_servers=servers[::-1], n_gpu_layers=-1) as b:
        assert greedy(a, "hello") == greedy(b, "hello")


@pytest.mark.slow
def test_gemma_across_two_servers_matches_local(gemma_path, servers):
    """The same tokens as a local run without ggml-cpu's repacked weights (``use_extra_bufts=False``):
    an rpc-server's CPU device keeps Q4_K weights as they are, and the repacked GEMM kernels of
    a default local run change gemma3-270m's logits by up to ~0.93 (greedy tokens from the 5th on)."""
    prompt = "The capital of France is"
    with lb.Model(gemma_path, use_extra_bufts=False) as local:
        want = greedy(local, prompt)
    with lb.Model(gemma_path, rpc_servers=servers, n_gpu_layers=-1) as model:
        assert greedy(model, prompt) == want


# Run in a child process: were the server's loss to abort the process again (ggml-rpc's own
# behaviour, RPC_STATUS_ASSERT), the test fails with the child's exit status instead of killing pytest.
LOSING = textwrap.dedent("""
    import json, os, socket, sys, llamabind as lb
    model_path, endpoint, mode = sys.argv[1:4]
    out = {}
    model = lb.Model(model_path, rpc_servers=[endpoint], n_gpu_layers=-1)
    host, port = endpoint.split(":")
    keepalive = []
    for fd in os.listdir("/proc/self/fd"):  # ggml-rpc's connection to the server
        try:
            s = socket.socket(fileno=int(fd))
        except OSError:
            continue
        try:
            if s.family == socket.AF_INET and s.getpeername() == (host, int(port)):
                keepalive.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0)
        except OSError:
            pass
        finally:
            s.detach()
    out["keepalive"] = keepalive
    ctx = lb.Context(model, n_ctx=4096)
    tokens = []
    try:
        for ev in lb.generate(ctx, "hello", max_tokens=4000, sampler=lb.Sampler.greedy(), ignore_eog=True):
            if isinstance(ev, lb.TokenEvent) and ev.token is not None:
                tokens.append(ev.token)
                if len(tokens) == 3:
                    print("GENERATING", flush=True)
                    if mode == "between":
                        sys.stdin.readline()  # the test kills the server now, between two decodes
    except lb.LlamaError as e:
        out["error"] = [type(e).__name__, str(e), getattr(e, "endpoints", None), isinstance(e, ConnectionError)]
    out["tokens"] = len(tokens)
    try:  # every later use of the model says the same, without reaching the server
        lb.Context(model, n_ctx=256)
    except lb.LlamaError as e:
        out["later"] = type(e).__name__
    ctx.close()
    model.close()  # frees the remote buffers: must not abort either
    try:
        lb.Model(model_path, rpc_servers=[endpoint], n_gpu_layers=-1)
    except lb.LlamaError as e:
        out["reload"] = [type(e).__name__, str(e)]
    print("RESULT " + json.dumps(out), flush=True)
""")


def _lose_server(model_path: str, mode: str) -> dict:
    """Generate through one rpc-server, kill it (between two decodes, or while the child computes)
    and return what the child saw."""
    proc, endpoint = start_server()
    try:
        child = subprocess.Popen([sys.executable, "-c", LOSING, model_path, endpoint, mode], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "GENERATING"
        stop(proc)
        t0 = time.monotonic()
        out, err = child.communicate("\n", timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            stop(proc)
    assert child.returncode == 0, (child.returncode, out, err[-2000:])
    assert elapsed < 30
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result["keepalive"] == [True], result  # a vanished host fails the call (patch: TCP keepalive)
    name, message, endpoints, is_connection_error = result["error"]
    assert name == "RpcServerLostError" and endpoints == [endpoint] and is_connection_error, result
    assert endpoint in message and "load it again" in message
    assert 3 <= result["tokens"] < 4000  # the tokens made before the loss were delivered
    assert result["later"] == "RpcServerLostError"
    assert result["reload"][0] == "ModelLoadError" and "Connection refused" in result["reload"][1], result
    assert "Remote RPC server crashed" not in err  # ggml-rpc's abort message
    return result


def test_server_dying_between_decodes_raises(tiny_model_path):
    """The server dies while the application handles a token: the next decode raises
    RpcServerLostError (the process lives on), later uses say the same, the model closes cleanly."""
    _need_rpc()
    _lose_server(tiny_model_path, "between")


@pytest.mark.slow
def test_server_dying_during_decodes_raises(gemma_path):
    """The server is killed while the child streams (most of the time inside a remote
    computation: gemma's decode outlasts the Python between tokens): RpcServerLostError."""
    _need_rpc()
    _lose_server(gemma_path, "during")


def test_restarted_server_serves_a_new_model(tiny_model_path):
    """Once the lost model is closed, a server started again on the same endpoint serves a new
    model in the same process (ggml-rpc reconnects; the lost mark is cleared)."""
    _need_rpc()
    proc, endpoint = start_server()
    port = int(endpoint.rsplit(":", 1)[1])
    with lb.Model(tiny_model_path) as local:
        want = greedy(local, "hello", n=8)
    model = lb.Model(tiny_model_path, rpc_servers=[endpoint], n_gpu_layers=-1)
    ctx = lb.Context(model, n_ctx=256)
    stop(proc)
    with pytest.raises(lb.RpcServerLostError):
        list(lb.generate(ctx, "hello", max_tokens=4, sampler=lb.Sampler.greedy()))
    assert rpc.server_lost(endpoint)
    with pytest.raises(lb.ModelLoadError, match="was lost while a model of this process"):
        lb.Model(tiny_model_path, rpc_servers=[endpoint], n_gpu_layers=-1)
    ctx.close()
    model.close()
    again, _ = start_server(port=port)
    try:
        with lb.Model(tiny_model_path, rpc_servers=[endpoint], n_gpu_layers=-1) as model:
            assert not rpc.server_lost(endpoint)
            assert greedy(model, "hello", n=8) == want
    finally:
        stop(again)


def test_engine_ends_its_requests_when_a_server_is_lost(tiny_model_path):
    """Continuous batching over an RPC model: the server's loss ends every running request with
    RpcServerLostError (the tokens so far kept), as a failed decode does; later requests end so too."""
    _need_rpc()
    proc, endpoint = start_server()
    try:
        with lb.Model(tiny_model_path, rpc_servers=[endpoint], n_gpu_layers=-1) as model:
            with lb.EngineThread(lb.Engine.load(model, n_slots=2, n_ctx=1024, n_threads=1)) as et:
                streams = [et.generate(prompt=f"hello {i}", max_tokens=5000, ignore_eog=True) for i in range(2)]
                for stream in streams:
                    next(stream)
                stop(proc)
                done = [[ev for ev in stream if isinstance(ev, lb.DoneEvent)][-1] for stream in streams]
                for d in done:
                    assert d.finish_reason == "error" and isinstance(d.error, lb.RpcServerLostError), d
                    assert 0 < len(d.tokens) < 5000
                later = et.complete(prompt="again", max_tokens=2)  # the engine lives; the model cannot compute
                assert later.finish_reason == "error" and isinstance(later.error, lb.RpcServerLostError)
    finally:
        if proc.poll() is None:
            stop(proc)


def test_builds_without_rpc_say_so(tiny_model_path):
    if rpc.supported():
        pytest.skip(f"accelerator {_build_info.ACCELERATOR} has the RPC backend")
    with pytest.raises(lb.ModelLoadError, match="no RPC backend"):
        lb.Model(tiny_model_path, rpc_servers=["127.0.0.1:50052"], n_gpu_layers=-1)
    with pytest.raises(lb.ModelLoadError, match="no RPC backend"):
        rpc.server_lost("127.0.0.1:50052")
    out = subprocess.run([sys.executable, "-c", "from llamabind import rpc; rpc.serve([])"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "no RPC backend" in out.stderr
