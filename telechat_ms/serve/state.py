"""What every route shares: the server's state, model-name and length checks, prompt rendering off the event
loop, submitting to the engine, collecting answers while watching for the client leaving, SSE framing."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Mapping, Sequence

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from telechat_ms.chat_template import apply_chat_template
from telechat_ms.infer.gen_config import GenerationConfig
from telechat_ms.serve.async_engine import AsyncEngine, Submission
from telechat_ms.serve.engine import Engine, EngineStopped, QueueFull
from telechat_ms.serve.output import Delta, TokenLogprob
from telechat_ms.serve.protocol import APIError
from telechat_ms.serve.sampler import SamplingParams

RETRY_AFTER_SECONDS = "1"


@dataclass
class ServeState:
    """The model being served and the server's settings."""

    engine: Engine
    tokenizer: Any
    model_name: str
    generation_config: GenerationConfig
    model_dir: str = ""
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.aengine = AsyncEngine(self.engine)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size


def state_of(request: Request) -> ServeState:
    return request.app.state.serve


def check_model(state: ServeState, model: str | None) -> None:
    """404 for a model name this server does not serve (None means the served model, as in vLLM)."""
    if model is not None and model != state.model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{state.model_name}`.",
                       param="model")


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def render_chat(state: ServeState, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None,
                      add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the chat template rendering (in a worker thread: long prompts must not stall the loop)."""
    def work() -> list[int]:
        return state.tokenizer.encode(apply_chat_template(messages, tools=tools,
                                                          add_generation_prompt=add_generation_prompt))
    try:
        return await run_in_threadpool(work)
    except ValueError as exc:  # the template names the message and field at fault
        text = str(exc)
        param = text.split(":", 1)[0] if text.startswith("messages[") else "messages"
        raise APIError(400, text, param=param) from None


async def encode_text(state: ServeState, text: str) -> list[int]:
    return await run_in_threadpool(state.tokenizer.encode, text)


def check_token_ids(state: ServeState, ids: Sequence[int], param: str) -> None:
    bad = [i for i in ids if i >= state.vocab_size]
    if bad:
        raise APIError(400, f"{param}: token id(s) {sorted(set(bad))[:8]} are outside the vocabulary "
                       f"(size {state.vocab_size})", param=param)


def resolve_max_tokens(state: ServeState, prompt_len: int, requested: int | None, default: int,
                       prompt_field: str, tokens_field: str = "max_tokens") -> int:
    """The answer budget: the request's (400 naming the field when prompt + it exceeds the model length), else the
    default capped to what the context has left."""
    limit = state.max_model_len
    if prompt_len < 1:
        raise APIError(400, f"{prompt_field}: the prompt is empty (it needs at least one token)", param=prompt_field)
    needed = 0 if requested == 0 else 1
    if prompt_len + needed > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, the {prompt_field} "
                       f"has {prompt_len} tokens, which leaves no room for an answer. Please shorten the "
                       f"{prompt_field}.", param=prompt_field)
    if requested is None:
        return max(0, min(default, limit - prompt_len))
    if prompt_len + requested > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{prompt_len + requested} tokens ({prompt_len} in the {prompt_field}, {requested} in "
                       f"{tokens_field}). Please reduce the length of the {prompt_field} or {tokens_field}.",
                       param=tokens_field)
    return requested


def submit(state: ServeState, prompts: list[list[int]], params: list[SamplingParams],
           choices: list[int] | None = None) -> Submission:
    """Queue the sequences of one request; 503 (+ Retry-After) when the queue is full or the engine is down."""
    engine = state.engine
    if len(prompts) > engine.batch + engine.max_queue:
        raise APIError(400, f"n: {len(prompts)} sequences (prompts x n) can never fit the {engine.batch} rows and "
                       f"{engine.max_queue} queue places of this server", param="n")
    try:
        return state.aengine.generate(prompts, params, choices)
    except QueueFull as exc:
        raise APIError(503, f"The server is busy: {exc}. Retry later.", err_type="ServiceUnavailable",
                       headers={"Retry-After": RETRY_AFTER_SECONDS}) from None
    except EngineStopped as exc:
        raise APIError(503, f"The server is not serving: {exc}.", err_type="ServiceUnavailable") from None


@dataclass
class ChoiceResult:
    """Everything one sequence sent, put together."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs or []
        self.prompt_tokens, self.completion_tokens = delta.prompt_tokens, delta.completion_tokens
        if delta.finished:
            self.finish_reason, self.stop_reason, self.error = delta.finish_reason, delta.stop_reason, delta.error


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable) -> Any:
    """Await `work`, cancelling it (and so its sequences) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGone()


async def collect(request: Request, sub: Submission, count: int) -> list[ChoiceResult]:
    """Every choice's whole answer (non-streaming requests); 5xx when the engine failed them."""
    results = [ChoiceResult(i) for i in range(count)]

    async def consume() -> None:
        async for delta in sub.updates():
            results[delta.index].add(delta)

    await until_disconnect(request, consume())
    failed = [r for r in results if r.finish_reason in ("error", "abort")]
    if failed:
        status = 500 if failed[0].finish_reason == "error" else 503
        raise APIError(status, f"generation failed: {failed[0].error or failed[0].finish_reason}")
    return results


def chunk_writer(rid: str, obj: str, created: int, model: str, include_usage: bool):
    """chunk(choices, usage) -> one SSE event of a streamed response (`usage` present when asked for: null until
    the final chunk, as the OpenAI API streams it)."""
    def chunk(choices: list[dict[str, Any]], with_usage: dict[str, int] | None = None) -> str:
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if include_usage:
            body["usage"] = with_usage
        return sse(body)
    return chunk


def sse(obj: Any) -> str:
    """One server-sent event carrying JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def token_text(tokenizer, context: Sequence[int], token: int) -> str:
    """The text one token adds after `context` (SentencePiece drops a leading space at the start of a decode, so
    the last few context ids are decoded with it); special tokens appear as their strings."""
    ctx = list(context[-4:])
    before = tokenizer.decode(ctx, skip_special_tokens=False)
    after = tokenizer.decode(ctx + [int(token)], skip_special_tokens=False)
    return after[len(before):] if after.startswith(before) else tokenizer.decode([int(token)], False)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
