"""POST /v1/completions: prompts as text, texts, token ids or lists of token ids; `echo` + integer `logprobs`
(+ `max_tokens: 0`) returns the prompt's per-token log-probs from a full forward, first token null, the shape
lm-evaluation-harness's `local-completions` scores multiple-choice tasks with."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from telechat_ms.serve.async_engine import Submission
from telechat_ms.serve.engine import EngineStopped
from telechat_ms.serve.output import TokenLogprob
from telechat_ms.serve.params import reject_unsupported, sampling_params
from telechat_ms.serve.protocol import APIError, CompletionRequest, error_body
from telechat_ms.serve.state import (ClientGone, ServeState, check_model, check_token_ids, chunk_writer, collect,
                                     encode_text, request_id, resolve_max_tokens, sse, state_of, submit, token_text,
                                     until_disconnect, usage)

router = APIRouter()
DEFAULT_MAX_TOKENS = 16   # OpenAI's and vLLM's default for completions


@dataclass
class Prompt:
    ids: list[int]
    text: str
    max_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None   # of tokens 1.. (echo + logprobs)


@dataclass
class LogprobWriter:
    """Builds the completions logprobs object {tokens, token_logprobs, top_logprobs, text_offset} token by token."""

    tokenizer: Any
    context: list[int]
    as_ids: bool = False        # return_tokens_as_token_ids
    offset: int = 0
    out: dict[str, list] = field(default_factory=lambda: {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                          "text_offset": []})

    def _name(self, token: int, text: str | None = None) -> str:
        if self.as_ids:
            return f"token_id:{token}"
        return token_text(self.tokenizer, self.context, token) if text is None else text

    def add(self, token: int, lp: TokenLogprob | None) -> None:
        text = token_text(self.tokenizer, self.context, token)
        self.out["tokens"].append(self._name(token, text))
        self.out["text_offset"].append(self.offset)
        if lp is None:
            self.out["token_logprobs"].append(None)
            self.out["top_logprobs"].append(None)
        else:
            top = {self._name(token, text): lp.logprob}
            for alt, value in lp.top:   # ids whose texts coincide (byte pieces) share a key holding the larger
                key = self._name(alt)       # log-prob, so max(top.values()) is still the best one (lm-eval's
                top[key] = max(top.get(key, value), value)   # greedy check); as_ids keeps them apart
            self.out["token_logprobs"].append(lp.logprob)
            self.out["top_logprobs"].append(top)
        self.offset += len(text)
        self.context.append(token)

    def take(self) -> dict[str, list]:
        """What was added since the last take (a stream chunk's share)."""
        out, self.out = self.out, {k: [] for k in self.out}
        return out


async def _prompts(state: ServeState, req: CompletionRequest) -> list[Prompt]:
    raw = req.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    prompts = []
    for i, item in enumerate(raw):
        param = "prompt" if len(raw) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            ids = await encode_text(state, item)
            prompts.append(Prompt(ids, item))
        else:
            check_token_ids(state, item, param)
            prompts.append(Prompt(list(item), state.tokenizer.decode(item, skip_special_tokens=False)))
        if not prompts[-1].ids:
            raise APIError(400, f"{param}: the prompt is empty (it needs at least one token)", param=param)
    return prompts


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request) -> Response:
    state = state_of(request)
    check_model(state, req.model)
    reject_unsupported(req)
    prompts = await _prompts(state, req)
    explicit = "max_tokens" in req.model_fields_set
    requested = req.max_tokens if explicit else None
    default = DEFAULT_MAX_TOKENS if not explicit else state.max_model_len
    for p in prompts:
        p.max_tokens = resolve_max_tokens(state, len(p.ids), requested, default, "prompt")
    if req.echo and req.logprobs is not None:
        if state.engine.scorer is None:
            raise APIError(400, "logprobs: prompt log-probs (echo) are not available on this server", "logprobs")
        try:
            for p in prompts:
                p.logprobs = await until_disconnect(request, state.aengine.score(p.ids, req.logprobs))
        except ClientGone:
            return Response(status_code=499)
        except EngineStopped as exc:
            raise APIError(503, f"The server is not serving: {exc}.") from None
        except Exception as exc:  # the engine logged it; the client gets the reason, not a traceback
            raise APIError(500, f"scoring the prompt failed: {type(exc).__name__}: {exc}") from None
    seq_prompts, seq_params, choices = [], [], []
    for p in prompts:
        params = sampling_params(state, req, max(p.max_tokens, 1), req.logprobs)
        for j in range(req.n):
            seq_prompts.append(p.ids)
            seq_params.append(params)
            choices.append(j)
    generate = any(p.max_tokens > 0 for p in prompts)
    if generate and any(p.max_tokens == 0 for p in prompts):
        raise APIError(400, "max_tokens: 0 applies to every prompt of the request", param="max_tokens")
    sub = submit(state, seq_prompts, seq_params, choices) if generate else None
    rid = request_id("cmpl")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(state, req, prompts, sub, rid, include_usage), media_type="text/event-stream")
    if sub is not None:
        try:
            results = await collect(request, sub, len(seq_prompts))
        except ClientGone:
            return Response(status_code=499)
    out, completion_tokens = [], 0
    for index in range(len(seq_prompts)):
        p = prompts[index // req.n]
        writer = LogprobWriter(state.tokenizer, [], req.return_tokens_as_token_ids)
        text = p.text if req.echo else ""
        if req.echo and req.logprobs is not None:
            for k, token in enumerate(p.ids):
                writer.add(token, p.logprobs[k - 1] if k else None)
        reason, stop_reason = "length", None
        if sub is not None:
            r = results[index]
            text += r.text
            writer.context = writer.context or list(p.ids)
            for lp in r.logprobs:
                writer.add(lp.token_id, lp)
            reason, stop_reason, completion_tokens = r.finish_reason, r.stop_reason, completion_tokens + \
                r.completion_tokens
        out.append({"index": index, "text": text, "logprobs": writer.out if req.logprobs is not None else None,
                    "finish_reason": reason, "stop_reason": stop_reason})
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": state.model_name,
            "choices": out, "usage": usage(sum(len(p.ids) for p in prompts), completion_tokens)}
    return JSONResponse(body)


async def _stream(state: ServeState, req: CompletionRequest, prompts: list[Prompt], sub: Submission | None,
                  rid: str, include_usage: bool) -> AsyncIterator[str]:
    created, total = int(time.time()), len(prompts) * req.n
    want_lp = req.logprobs is not None

    chunk = chunk_writer(rid, "text_completion", created, state.model_name, include_usage)

    writers = []
    for index in range(total):
        p = prompts[index // req.n]
        writer = LogprobWriter(state.tokenizer, [], req.return_tokens_as_token_ids)
        if req.echo:
            if want_lp:
                for k, token in enumerate(p.ids):
                    writer.add(token, p.logprobs[k - 1] if k else None)
            finish = "length" if sub is None else None
            yield chunk([{"index": index, "text": p.text, "logprobs": writer.take() if want_lp else None,
                          "finish_reason": finish, "stop_reason": None}])
        elif sub is None:
            yield chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": "length",
                          "stop_reason": None}])
        writer.context = writer.context or list(p.ids)
        writers.append(writer)
    completion = [0] * total
    if sub is not None:
        async for d in sub.updates():
            completion[d.index] = d.completion_tokens
            if d.finish_reason in ("error", "abort"):
                yield sse(error_body(500 if d.finish_reason == "error" else 503, f"generation failed: {d.error}"))
                continue
            lps = None
            if want_lp:
                for lp in d.logprobs or []:
                    writers[d.index].add(lp.token_id, lp)
                lps = writers[d.index].take()
            yield chunk([{"index": d.index, "text": d.text, "logprobs": lps, "finish_reason": d.finish_reason,
                          "stop_reason": d.stop_reason}])
    if include_usage:
        yield chunk([], usage(sum(len(p.ids) for p in prompts), sum(completion)))
    yield "data: [DONE]\n\n"
