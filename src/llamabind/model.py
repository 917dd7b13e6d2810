"""A loaded model (``llama_model``): weights, metadata, vocabulary, chat template, LoRA adapters."""

from __future__ import annotations

import hashlib
import os
import weakref
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence

from . import _params, _shutdown, fit, rpc
from ._gate import SharedGate
from ._handle import Handle
from .raw import clear_errors, fail, ffi, lib
from .errors import InvalidInputError, LlamaError, ModelLoadError, ModelNotFoundError
from .gguf_check import check_gguf
from .vocab import Vocab

ProgressCallback = Callable[[float], "bool | None"]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: str | os.PathLike, expected: str | None) -> None:
    """ModelLoadError unless the file's SHA-256 is ``expected`` (None: no check), before anything reads it."""
    if expected is not None and (actual := sha256_file(path)) != expected.lower():
        raise ModelLoadError(f"{path}: sha256 {actual} does not match the expected {expected}")


def _check_path(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelNotFoundError(f"{what} not found: {path}")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{what} is not a regular file: {path}")
    return path


class _Progress:
    """Carries a Python progress callable into llama.cpp, and any exception it raised back out."""

    def __init__(self, fn: ProgressCallback) -> None:
        self.fn = fn
        self.error: BaseException | None = None
        self.cancelled = False
        self.handle = ffi.new_handle(self)

    @classmethod
    def attach(cls, params, fn: ProgressCallback | None) -> "_Progress | None":
        """Point ``params.progress_callback`` at ``fn``; the returned state must outlive the load."""
        if fn is None:
            return None
        state = cls(fn)
        params.progress_callback = lib._llamabind_progress
        params.progress_callback_user_data = state.handle
        return state


def load_failed(state: "_Progress | None", error: type[LlamaError], path: str, what: str) -> NoReturn:
    """Raise why a load with a progress callback returned NULL: the callback's exception, its
    cancellation, or what llama.cpp logged."""
    if state is not None and state.error is not None:
        raise error(f"{path}: progress callback raised {state.error!r}") from state.error
    if state is not None and state.cancelled:
        clear_errors()
        raise error(f"{path}: load cancelled by the progress callback")
    fail(error, what)


@ffi.def_extern()
def _llamabind_progress(progress: float, user_data) -> bool:
    state: _Progress = ffi.from_handle(user_data)
    try:
        state.cancelled = state.fn(progress) is False
    except BaseException as e:  # surfaced after llama.cpp returns
        state.error, state.cancelled = e, True
    return not state.cancelled


def _read_str(fn: Callable[..., int], *args: Any) -> str | None:
    """Call a snprintf-style llama.cpp getter; None when it reports -1 (absent)."""
    size = 256
    while True:
        buf = ffi.new("char[]", size)
        n = fn(*args, buf, size)
        if n < 0:
            return None
        if n < size:
            return ffi.string(buf, n).decode("utf-8", "replace")
        size = n + 1


def _fact(name: str, doc: str | None = None) -> Any:
    """A Model property reading a fact cached at load (ClosedError once the model is closed)."""
    def get(self: "Model") -> Any:
        self.ptr
        return self._facts[name]
    return property(get, doc=doc)


class Model(Handle):
    """A GGUF model loaded by llama.cpp.

    The file is checked before llama.cpp sees it: it must exist, match ``sha256`` if given,
    and have a sound GGUF header and tensor table. ``progress`` is called with a fraction
    in [0, 1] while loading; returning False cancels the load (ModelLoadError).
    ``rpc_servers`` (``["host:port", ...]``, ``+rpc`` builds) offloads layers to ggml RPC servers
    too, each checked within ``rpc_timeout`` seconds first (``llamabind.rpc``).
    Extra keyword arguments set fields of ``llama_model_params`` by name.
    ``n_gpu_layers="auto"`` fits the layers to the devices' free memory (``llamabind.fit``).
    """

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int | fit.Auto = 0, main_gpu: int = 0,
                 split_mode: str | int = "layer", use_mmap: bool | None = None, use_mlock: bool = False,
                 sha256: str | None = None, progress: ProgressCallback | None = None,
                 check: bool = True, rpc_servers: Sequence[str] | None = None, rpc_timeout: float = 5.0,
                 **params: Any) -> None:
        path = _check_path(path, "model file")
        check_sha256(path, sha256)
        if check:
            check_gguf(path)
        mparams = lib.llama_model_default_params()
        values = {"n_gpu_layers": fit.layers(n_gpu_layers), "main_gpu": main_gpu, "split_mode": split_mode, **params}
        _params.apply(mparams, "struct llama_model_params", values)
        mode = _load_mode(use_mmap, use_mlock)
        if mode is not None:
            mparams.load_mode = mode
        state = _Progress.attach(mparams, progress)
        remote = rpc.devices(rpc_servers, rpc_timeout) if rpc_servers is not None else None
        if remote is not None:
            mparams.devices = remote.array
        report = fit.fit_model(path, mparams) if n_gpu_layers == fit.AUTO else None
        clear_errors()
        ptr = lib.llama_model_load_from_file(path.encode(), mparams)
        lost = remote.lost() if remote is not None else []
        if ptr == ffi.NULL or lost:
            if ptr != ffi.NULL:
                lib.llama_model_free(ptr)  # its remote weights never arrived
            if remote is not None:
                remote.close()
            if lost:
                raise ModelLoadError(f"RPC server {', '.join(lost)} was lost while {path} loaded")
            load_failed(state, ModelLoadError, path, f"llama.cpp could not load {path}")
        super().__init__(ptr, lib.llama_model_free)
        self._rpc = remote  # the endpoints stay marked in use while the model lives
        if remote is not None:
            self.adopt(remote)
        self.path = path
        self.fit = report  # n_gpu_layers="auto": what the fit chose and why (llamabind.fit.FitReport)
        self.vocab_only = bool(mparams.vocab_only)
        self._gate = SharedGate("the model")
        self._facts = _facts(ptr)  # read once: getters never touch a pointer that close() may free
        _shutdown.track(self)
        self._vocab: weakref.ref[Vocab] | None = None
        self._pieces: dict[bool, dict[int, tuple[bytes, bool]]] = {False: {}, True: {}}  # see Vocab
        self._texts: dict[bytes, str | None] = {}  # pieces as text, None where not whole UTF-8 (Detokenizer)

    @property
    def vocab(self) -> Vocab:
        """The model's vocabulary (it keeps the model alive; the model does not keep it)."""
        v = self._vocab() if self._vocab is not None else None
        if v is None:
            with self._gate:
                v = Vocab(self)
            self._vocab = weakref.ref(v)
        return v

    def hold(self) -> SharedGate:
        """Use the model for a few calls (``with model.hold(): ...``): several threads at once,
        and ``close()`` waits for them to leave; ClosedError once closing."""
        return self._gate

    def close(self) -> None:
        """Free the model: its contexts and adapters first (each waits for a running decode)."""
        if self._ptr is None:
            return
        # No new users, contexts or adapters from here on; those inside (a tokenizer, a context
        # being created) finish first. A decode loop that then needs the model gets ClosedError.
        self._gate.shut()
        # contexts first: an adapter closed before them would have to leave contexts an engine drives
        for child in sorted(self._children, key=lambda c: isinstance(c, LoraAdapter)):
            child.close()
        super().close()

    # -- facts (read when the model opens) -----------------------------------------------------
    n_ctx_train = _fact("n_ctx_train", "training context length")
    n_embd = _fact("n_embd", "embedding size")
    n_embd_out = _fact("n_embd_out", "output embedding size")
    n_layer = _fact("n_layer")
    n_head = _fact("n_head")
    n_head_kv = _fact("n_head_kv")
    n_swa = _fact("n_swa")
    n_params = _fact("n_params", "number of parameters")
    size = _fact("size", "size of all tensors in bytes")
    n_cls_out = _fact("n_cls_out", "classifier outputs (rerankers)")
    is_recurrent = _fact("is_recurrent")
    is_hybrid = _fact("is_hybrid")
    is_diffusion = _fact("is_diffusion")
    has_encoder = _fact("has_encoder")
    has_decoder = _fact("has_decoder")
    description = _fact("description", "llama.cpp's one-line description, e.g. ``gemma3 270M Q4_K - Medium``")

    @property
    def metadata(self) -> dict[str, str]:
        """All GGUF key/value pairs (values as llama.cpp renders them), a copy."""
        self.ptr
        return dict(self._facts["metadata"])

    def meta(self, key: str, default: str | None = None) -> str | None:
        """One GGUF metadata value by key."""
        self.ptr
        return self._facts["metadata"].get(key, default)

    name = property(lambda self: self.meta("general.name"), doc="general.name, if set")
    architecture = property(lambda self: self.meta("general.architecture"), doc="general.architecture")

    def chat_template(self, name: str | None = None) -> str | None:
        """The model's (or a named) chat template stored in the GGUF, or None."""
        with self._gate:
            p = lib.llama_model_chat_template(self.ptr, name.encode() if name else ffi.NULL)
            return None if p == ffi.NULL else ffi.string(p).decode("utf-8", "replace")

    def apply_chat_template(self, messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True,
                            template: str | None = None) -> str:
        """Render chat ``messages`` ({"role", "content"}) with llama.cpp's template engine.

        ``template`` is a template text or a built-in name (``chatml``, ``gemma``, ...);
        by default the model's own, else the built-in one named after its architecture.
        Unsupported templates raise InvalidInputError.
        """
        msgs = list(messages)
        tmpl = template if template is not None else self.chat_template() or self._builtin_template()
        if tmpl is None:
            raise InvalidInputError("the model has no chat template; pass template=")
        keep = []
        chat = ffi.new("llama_chat_message[]", len(msgs))
        for i, m in enumerate(msgs):
            try:
                role, content = m["role"], m["content"]
            except (KeyError, TypeError):
                raise InvalidInputError(f"message {i} needs 'role' and 'content'") from None
            if not isinstance(role, str) or not isinstance(content, str):
                raise InvalidInputError(f"message {i}: role and content must be str")
            try:
                r, c = ffi.new("char[]", role.encode()), ffi.new("char[]", content.encode("utf-8", "strict"))
            except UnicodeEncodeError as e:
                raise InvalidInputError(f"message {i} is not valid UTF-8 (lone surrogate at {e.start})") from None
            keep += [r, c]
            chat[i].role, chat[i].content = r, c
        ctmpl = tmpl.encode()
        size = max(1024, 2 * sum(len(m["content"]) for m in msgs) + 256)
        for _ in range(2):
            buf = ffi.new("char[]", size)
            n = lib.llama_chat_apply_template(ctmpl, chat, len(msgs), add_generation_prompt, buf, size)
            if n < 0:
                raise InvalidInputError("chat template not supported by llama_chat_apply_template")
            if n <= size:
                return ffi.unpack(buf, n).decode("utf-8", "replace")
            size = n
        raise InvalidInputError("chat template rendering did not converge")

    def _builtin_template(self) -> str | None:
        """llama.cpp's built-in template named like the architecture (``gemma3`` -> ``gemma``)."""
        arch = (self.architecture or "").lower()
        names = builtin_chat_templates()
        for cand in (arch, arch.rstrip("0123456789.")):
            if cand in names:
                return cand
        return None

    # -- LoRA --------------------------------------------------------------------------------
    def load_lora(self, path: str | os.PathLike) -> "LoraAdapter":
        """Load a LoRA adapter for this model; apply it with ``Context.set_loras``."""
        return LoraAdapter(self, path)


def _facts(ptr: Any) -> dict[str, Any]:
    """What a model's getters report, read once while nothing can free it."""
    meta = {}
    for i in range(lib.llama_model_meta_count(ptr)):
        key = _read_str(lambda b, n: lib.llama_model_meta_key_by_index(ptr, i, b, n))
        val = _read_str(lambda b, n: lib.llama_model_meta_val_str_by_index(ptr, i, b, n))
        if key is not None:
            meta[key] = val or ""
    layers = lib.llama_model_n_layer(ptr)
    return {
        "n_ctx_train": lib.llama_model_n_ctx_train(ptr), "n_embd": lib.llama_model_n_embd(ptr),
        "n_embd_out": lib.llama_model_n_embd_out(ptr), "n_layer": lib.llama_model_n_layer(ptr),
        # llama.cpp aborts asking a model without layers (vocab_only) for its heads
        "n_head": lib.llama_model_n_head(ptr) if layers else 0,
        "n_head_kv": lib.llama_model_n_head_kv(ptr) if layers else 0,
        "n_swa": lib.llama_model_n_swa(ptr), "n_params": int(lib.llama_model_n_params(ptr)),
        "size": int(lib.llama_model_size(ptr)), "n_cls_out": lib.llama_model_n_cls_out(ptr),
        "is_recurrent": bool(lib.llama_model_is_recurrent(ptr)), "is_hybrid": bool(lib.llama_model_is_hybrid(ptr)),
        "is_diffusion": bool(lib.llama_model_is_diffusion(ptr)),
        "has_encoder": bool(lib.llama_model_has_encoder(ptr)), "has_decoder": bool(lib.llama_model_has_decoder(ptr)),
        "description": _read_str(lambda b, n: lib.llama_model_desc(ptr, b, n)) or "", "metadata": meta,
    }


def builtin_chat_templates() -> list[str]:
    """Names of the chat templates llama_chat_apply_template knows without a model."""
    n = lib.llama_chat_builtin_templates(ffi.NULL, 0)
    arr = ffi.new("const char *[]", n)
    lib.llama_chat_builtin_templates(arr, n)
    return [ffi.string(arr[i]).decode() for i in range(n)]


class LoraAdapter(Handle):
    """A LoRA adapter loaded for one model; freed before the model."""

    def __init__(self, model: Model, path: str | os.PathLike) -> None:
        path = _check_path(path, "LoRA adapter")
        check_gguf(path)
        clear_errors()
        with model.hold():
            ptr = lib.llama_adapter_lora_init(model.ptr, path.encode())
        if ptr == ffi.NULL:
            fail(ModelLoadError, f"could not load LoRA adapter {path}")
        super().__init__(ptr, lib.llama_adapter_lora_free, parent=model)
        self.model = model
        self.path = path
        self._users: weakref.WeakSet[Any] = weakref.WeakSet()  # contexts that apply this adapter

    def close(self) -> None:
        """Free the adapter, after taking it out of every context that applies it."""
        for ctx in list(self._users):
            ctx._drop_lora(self)
        super().close()


def _load_mode(use_mmap: bool | None, use_mlock: bool) -> int | None:
    """Map the classic mmap/mlock flags onto llama_load_mode (None: keep llama.cpp's default)."""
    if use_mmap is None and not use_mlock:
        return None
    return {(True, False): lib.LLAMA_LOAD_MODE_MMAP, (True, True): lib.LLAMA_LOAD_MODE_MMAP_MLOCK,
            (False, True): lib.LLAMA_LOAD_MODE_MLOCK, (False, False): lib.LLAMA_LOAD_MODE_NONE,
            }[(use_mmap is not False, use_mlock)]
