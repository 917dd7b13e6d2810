"""Tiny random multimodal projectors (mmproj GGUF files) for tests, written with PyPI ``gguf``.

``write_tiny_mmproj`` writes a projector that libmtmd loads for a text model whose
embedding width is ``n_embd_text`` (``tinymodels.write_tiny_llama`` makes one):

- vision: a 1-layer SigLIP ViT with the ``gemma3`` projector (avg-pool by ``n_merge``,
  RMS norm, linear projection). A ``image_size`` x ``image_size`` image becomes
  ``(image_size / patch_size / n_merge) ** 2`` tokens (16 with the defaults), decoded
  with non-causal attention, as libmtmd does for Gemma 3.
- audio: a 1-layer Whisper encoder with the ``qwen2a`` projector (Qwen2-Audio): 16 kHz
  PCM, log-mel features in 30-second windows, 750 tokens per window.

Both can be in one file (``vision=True, audio=True``). Weights are deterministic
``normal * scale`` values in f32, so the same arguments always give the same bytes.
The output of a model using them is noise, but reproducible noise.

``write_png`` and ``write_wav`` write small media files with the standard library only.
"""

from __future__ import annotations

import os
import struct
import zlib

import gguf
import numpy as np

# SigLIP's normalisation (the values Gemma 3's preprocessor uses)
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


def n_image_tokens(image_size: int = 32, patch_size: int = 4, n_merge: int = 2) -> int:
    """Tokens one image becomes with a projector written with these arguments."""
    side = image_size // patch_size // n_merge
    return side * side


def write_tiny_mmproj(
    path: str | os.PathLike[str],
    *,
    n_embd_text: int = 64,
    vision: bool = True,
    audio: bool = False,
    seed: int = 0,
    # vision tower
    image_size: int = 32,
    patch_size: int = 4,
    n_merge: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    n_ff: int = 48,
    # audio tower
    n_mel: int = 80,
    n_embd_audio: int = 16,
    n_head_audio: int = 2,
    n_ff_audio: int = 24,
    n_pos_audio: int = 1500,
) -> str:
    """Write a random mmproj GGUF to ``path`` and return the path (as a str)."""
    if not (vision or audio):
        raise ValueError("a projector needs vision, audio or both")
    if image_size % (patch_size * n_merge):
        raise ValueError("image_size must be a multiple of patch_size * n_merge")
    path = os.fspath(path)
    rng = np.random.default_rng(seed)

    def rnd(*shape: int, scale: float = 0.02) -> np.ndarray:
        # numpy shape (rows, cols) is ggml ne = [cols, rows]: the last numpy axis is ne[0]
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    w = gguf.GGUFWriter(path, "clip")
    w.add_name("tiny-mmproj-random")
    w.add_description("random weights for tests")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_bool("clip.has_vision_encoder", vision)
    w.add_bool("clip.has_audio_encoder", audio)
    if vision and not audio:
        w.add_string("clip.projector_type", "gemma3")
    elif audio and not vision:
        w.add_string("clip.projector_type", "qwen2a")
    else:
        w.add_string("clip.vision.projector_type", "gemma3")
        w.add_string("clip.audio.projector_type", "qwen2a")

    def tower(prefix: str, d: int, heads: int, ff: int, k_bias: bool) -> None:
        """Hyperparameters and one pre-norm transformer block of a ViT/Whisper tower."""
        kind = "vision" if prefix == "v" else "audio"
        w.add_uint32(f"clip.{kind}.embedding_length", d)
        w.add_uint32(f"clip.{kind}.feed_forward_length", ff)
        w.add_uint32(f"clip.{kind}.block_count", 1)
        w.add_uint32(f"clip.{kind}.projection_dim", n_embd_text)
        w.add_uint32(f"clip.{kind}.attention.head_count", heads)
        w.add_float32(f"clip.{kind}.attention.layer_norm_epsilon", 1e-6)
        b = f"{prefix}.blk.0."
        w.add_tensor(b + "ln1.weight", ones(d))
        w.add_tensor(b + "ln1.bias", zeros(d))
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(b + name + ".weight", rnd(d, d, scale=0.2))
            if name != "attn_k" or k_bias:
                w.add_tensor(b + name + ".bias", rnd(d, scale=0.02))
        w.add_tensor(b + "ln2.weight", ones(d))
        w.add_tensor(b + "ln2.bias", zeros(d))
        w.add_tensor(b + "ffn_up.weight", rnd(ff, d, scale=0.2))
        w.add_tensor(b + "ffn_up.bias", rnd(ff))
        w.add_tensor(b + "ffn_down.weight", rnd(d, ff, scale=0.2))
        w.add_tensor(b + "ffn_down.bias", rnd(d))
        w.add_tensor(f"{prefix}.post_ln.weight", ones(d))
        w.add_tensor(f"{prefix}.post_ln.bias", zeros(d))

    if vision:
        n_patches = (image_size // patch_size) ** 2
        w.add_uint32("clip.vision.image_size", image_size)
        w.add_uint32("clip.vision.patch_size", patch_size)
        w.add_uint32("clip.vision.projector.scale_factor", n_merge)
        w.add_array("clip.vision.image_mean", IMAGE_MEAN)
        w.add_array("clip.vision.image_std", IMAGE_STD)
        w.add_bool("clip.use_gelu", True)
        # conv2d kernel: ggml ne [patch, patch, 3, n_embd]
        w.add_tensor("v.patch_embd.weight", rnd(n_embd, 3, patch_size, patch_size, scale=0.2))
        w.add_tensor("v.patch_embd.bias", rnd(n_embd))
        w.add_tensor("v.position_embd.weight", rnd(n_patches, n_embd, scale=0.2))
        tower("v", n_embd, n_head, n_ff, k_bias=True)
        w.add_tensor("mm.soft_emb_norm.weight", ones(n_embd))
        # ggml ne [n_embd_text, n_embd]: transposed in the graph
        w.add_tensor("mm.input_projection.weight", rnd(n_embd, n_embd_text, scale=1.0))

    if audio:
        w.add_uint32("clip.audio.num_mel_bins", n_mel)
        # conv1d kernels: ggml ne [3, in, out]
        w.add_tensor("a.conv1d.1.weight", rnd(n_embd_audio, n_mel, 3, scale=0.2))
        w.add_tensor("a.conv1d.1.bias", rnd(n_embd_audio, 1))  # ne [1, n_embd]: added per frame
        w.add_tensor("a.conv1d.2.weight", rnd(n_embd_audio, n_embd_audio, 3, scale=0.2))
        w.add_tensor("a.conv1d.2.bias", rnd(n_embd_audio, 1))
        w.add_tensor("a.position_embd.weight", rnd(n_pos_audio, n_embd_audio, scale=0.2))
        tower("a", n_embd_audio, n_head_audio, n_ff_audio, k_bias=False)
        w.add_tensor("mm.a.fc.weight", rnd(n_embd_text, n_embd_audio, scale=1.0))
        w.add_tensor("mm.a.fc.bias", rnd(n_embd_text))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_image(height: int = 24, width: int = 40, seed: int = 1) -> np.ndarray:
    """A deterministic RGB test picture, uint8 (H, W, 3): gradients plus a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                    128 + 100 * np.sin((x + y) / 3.0)], axis=-1)
    img = img + rng.integers(-20, 21, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode a uint8 (H, W, 3) array as an 8-bit RGB PNG (stdlib zlib only)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, c = rgb.shape
    assert c == 3
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def bmp_bytes(rgb: np.ndarray) -> bytes:
    """Encode a uint8 (H, W, 3) array as a 24-bit BMP."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    row = (w * 3 + 3) & ~3
    pixels = bytearray()
    for i in range(h - 1, -1, -1):  # bottom-up rows, BGR
        line = rgb[i, :, ::-1].tobytes()
        pixels += line + b"\x00" * (row - len(line))
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + info + bytes(pixels)


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> str:
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(png_bytes(rgb))
    return path


def make_tone(seconds: float = 1.0, rate: int = 16000, freq: float = 440.0) -> np.ndarray:
    """A float32 mono sine tone in [-0.5, 0.5]."""
    t = np.arange(int(seconds * rate), dtype=np.float64) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_bytes(pcm: np.ndarray, rate: int = 16000) -> bytes:
    """Encode float32 mono PCM as a 16-bit PCM WAV."""
    data = (np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
            + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


def write_wav(path: str | os.PathLike[str], pcm: np.ndarray, rate: int = 16000) -> str:
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(wav_bytes(pcm, rate))
    return path
