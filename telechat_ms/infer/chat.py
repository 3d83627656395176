"""model.chat(): multi-turn chat over the released chat template, whole answers or streamed text pieces.

History is a list of {"role", "content"} messages (roles system / user / bot|assistant, the chat template's
vocabulary); each call renders history + the new question with the template (spec section 5), generates until
<_end>, and returns the answer and a new history with the question and the answer ({"role": "bot"}) appended.
"""
from __future__ import annotations

import time
from typing import Any, Iterator, Mapping, Sequence

from telechat_ms.chat_template import apply_chat_template
from telechat_ms.infer.gen_config import GenerationConfig
from telechat_ms.infer.generate import iter_generate, prepare_rows, resolve_config
from telechat_ms.infer.streaming import TextStreamer


def build_messages(question: str, history: Sequence[Mapping[str, Any]] | None = None,
                   system: str | None = None) -> list[dict[str, Any]]:
    """history + the new user question; `system` replaces (or adds) the leading system message."""
    if not isinstance(question, str):
        raise ValueError(f"question: expected a string, got {type(question).__name__}")
    messages = [dict(m) for m in (history or [])]
    if system is not None:
        if messages and messages[0].get("role") == "system":
            messages[0] = {"role": "system", "content": system}
        else:
            messages.insert(0, {"role": "system", "content": system})
    messages.append({"role": "user", "content": question})
    return messages


def chat_prompt_ids(tokenizer, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None) -> list[int]:
    """Token ids of the template rendering with the generation prompt (a trailing <_bot>)."""
    return tokenizer.encode(apply_chat_template(messages, tools=tools, add_generation_prompt=True))


class ChatStream:
    """Iterator of answer text pieces; when exhausted, .answer, .history and .stats are set."""

    def __init__(self, model, tokenizer, messages: list[dict[str, Any]], config: GenerationConfig, use_jit: bool,
                 tools: Sequence[Any] | None = None):
        self.model, self.tokenizer, self.config, self.use_jit = model, tokenizer, config, use_jit
        self.messages = messages
        self.prompt_ids = chat_prompt_ids(tokenizer, messages, tools)
        self.answer: str | None = None
        self.history: list[dict[str, Any]] | None = None
        self.finish_reason = "length"
        self.stats: dict[str, float] = {}
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def _run(self) -> Iterator[str]:
        streamer = TextStreamer(self.tokenizer)
        stop_ids, n_new, timings = self.config.stop_ids, 0, {}
        start = time.perf_counter()
        for step in iter_generate(self.model, prepare_rows(self.prompt_ids), self.config, self.use_jit, timings):
            n_new += 1
            token = int(step.tokens[0])
            if token in stop_ids:
                self.finish_reason = "stop"
                break
            piece = streamer.put(token)
            if piece:
                yield piece
        piece = streamer.end()
        if piece:
            yield piece
        total = time.perf_counter() - start
        decode = float(sum(timings.get("step_seconds", [])))
        self.answer = streamer.text
        self.history = self.messages + [{"role": "bot", "content": self.answer}]
        self.stats = {"prompt_tokens": len(self.prompt_ids), "new_tokens": n_new, "seconds": total,
                      "prefill_seconds": timings.get("prefill_seconds", 0.0),
                      "tokens_per_second": n_new / total if total > 0 else 0.0,
                      "decode_tokens_per_second": (n_new - 1) / decode if decode > 0 else 0.0}


def chat(model, tokenizer, question: str, history: Sequence[Mapping[str, Any]] | None = None, stream: bool = False,
         system: str | None = None, tools: Sequence[Any] | None = None,
         generation_config: GenerationConfig | None = None, use_jit: bool = True, **options: Any):
    """(answer, history) for one more turn, or a ChatStream of text pieces when stream=True.

    options are GenerationConfig fields overriding the model's generation_config.json; the input history is
    not modified.
    """
    config = resolve_config(model, generation_config, options)
    stream_obj = ChatStream(model, tokenizer, build_messages(question, history, system), config, use_jit, tools)
    if stream:
        return stream_obj
    for _ in stream_obj:
        pass
    return stream_obj.answer, stream_obj.history
