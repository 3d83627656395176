"""The released TeleChat2 server's API (spec section 8), so its web demo and scripts work against this server:
POST /generate with its fields and defaults, answering in its JSON shape or its SSE shape (`data: {chunk}`, no
[DONE]). Unlike the release it renders the whole conversation (real multi-turn) and serves many requests at
once through the batching engine instead of one at a time behind a semaphore.
"""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from telechat_ms.serve.async_engine import Submission
from telechat_ms.serve.protocol import APIError, GenerateRequest, error_body
from telechat_ms.serve.sampler import SamplingParams
from telechat_ms.serve.state import ClientGone, collect, render_chat, sse, state_of, submit

router = APIRouter()


@router.post("/generate")
async def generate(req: GenerateRequest, request: Request) -> Response:
    state = state_of(request)
    if req.messages[-1].role != "user":
        raise APIError(400, f"messages: the last message must come from the user, got role "
                       f"{req.messages[-1].role!r}", param="messages")
    prompt = await render_chat(state, [m.model_dump() for m in req.messages], None)
    max_length = min(req.max_length, state.max_model_len)
    if max_length <= len(prompt):
        raise APIError(400, f"max_length: {req.max_length} (capped to the model length {state.max_model_len}) "
                       f"leaves no room for an answer after the {len(prompt)} prompt tokens", param="max_length")
    params = SamplingParams(max_tokens=max_length - len(prompt), temperature=req.temperature if req.do_sample else 0.0,
                            top_p=req.top_p, top_k=req.top_k, repetition_penalty=req.repetition_penalty,
                            stop_token_ids=tuple(sorted(state.generation_config.stop_ids)))
    sub = submit(state, [prompt], [params])
    if req.stream:
        return StreamingResponse(_stream(sub), media_type="text/event-stream")
    try:
        result = (await collect(request, sub, 1))[0]
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse({"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                      "finish_reason": result.finish_reason}],
                         "created": int(time.time()),
                         "usage": {"prompt_tokens": result.prompt_tokens,
                                   "completion_tokens": result.completion_tokens,
                                   "total_tokens": result.prompt_tokens + result.completion_tokens}})


async def _stream(sub: Submission) -> AsyncIterator[str]:
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    yield chunk({"role": "assistant"})
    async for d in sub.updates():
        if d.finish_reason in ("error", "abort"):
            yield sse(error_body(500 if d.finish_reason == "error" else 503, f"generation failed: {d.error}"))
            return
        if d.text:
            yield chunk({"content": d.text})
        if d.finished:
            yield chunk({}, d.finish_reason)
