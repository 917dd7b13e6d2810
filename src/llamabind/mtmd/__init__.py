"""Multimodal input through libmtmd: projectors, bitmaps (images, audio), chunks, generation.

libmtmd does the model-specific work (preprocessing, the vision/audio encoder, the
projector, begin/end-of-media tokens, non-causal attention, M-RoPE positions), so every
model family it supports works here without per-family code::

    mctx = MtmdContext(model, "mmproj.gguf")
    img = Bitmap.from_file(mctx, "cat.jpg")          # or Bitmap.from_array(rgb_uint8_hxwx3)
    chunks = mctx.tokenize(f"{mctx.marker} What is this?", [img])
    n_past = eval_chunks(ctx, chunks)                  # encode the media, decode everything
    for ev in llamabind.generate_after(ctx, n_past, n_prompt=chunks.n_tokens): ...

or, in one call, ``generate(ctx, mctx, prompt, [img])`` / ``generate(ctx, mctx,
messages=[{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
{"type": "text", "text": "What is this?"}]}])``.

Bad input is refused before libmtmd or llama.cpp can abort on it: InvalidInputError for
arrays and prompts, MediaError (both an MtmdError and an InvalidInputError) for media that
cannot be decoded or that the projector does not take, MtmdError for libmtmd failures.
"""

from .bitmap import Bitmap
from .chunks import Chunk, ChunkInfo, Chunks
from .context import MtmdContext
from .evaluation import eval_chunks
from .generation import complete, generate, render_chat
from .types import ChunkType, Media, MediaError, default_marker

__all__ = [
    "MtmdContext", "Bitmap", "Chunks", "Chunk", "ChunkInfo", "ChunkType", "MediaError",
    "default_marker", "eval_chunks", "generate", "complete", "render_chat", "Media",
]
