"""GenerationMixin: `model.generate(...)` and `model.chat(...)` for any causal LM that offers the kv-cache step.

Like Hugging Face's GenerationMixin it sits below the model and knows no concrete model: a model class inherits it
and provides `config` (head_dim, n_layer, ...) and `forward_with_cache(...)`; the tokenizer of `chat` is anything
with encode / decode.
"""
from __future__ import annotations

from typing import Any

from telechat_ms.infer.chat import chat
from telechat_ms.infer.generate import generate


class GenerationMixin:
    """Adds generate() and chat() to a model class."""

    def generate(self, input_ids: Any, **kwargs: Any):
        """Generate with the kv cache (greedy or sampling); see telechat_ms.infer.generate.generate."""
        return generate(self, input_ids, **kwargs)

    def chat(self, tokenizer, question: str, history: list | None = None, stream: bool = False, **kwargs: Any):
        """(answer, history), or an iterator of text pieces when stream=True; see telechat_ms.infer.chat.chat."""
        return chat(self, tokenizer, question, history=history, stream=stream, **kwargs)
