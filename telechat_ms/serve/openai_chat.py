"""POST /v1/chat/completions: messages rendered with the one chat template (tools in the released tools block),
answers as JSON or SSE chunks ending with `data: [DONE]`, `<tool_call>` blocks parsed into tool_calls."""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from telechat_ms.serve.async_engine import Submission
from telechat_ms.serve.output import TokenLogprob
from telechat_ms.serve.params import reject_unsupported, sampling_params
from telechat_ms.serve.protocol import APIError, ChatCompletionRequest, ChatMessage, error_body
from telechat_ms.serve.state import (ClientGone, ServeState, check_model, chunk_writer, collect, render_chat,
                                     request_id, resolve_max_tokens, sse, state_of, submit, token_text, usage)
from telechat_ms.serve.tool_parser import ToolCallStream, parse_tool_calls

router = APIRouter()


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as the chat template's {role, content, tool_calls} dicts (developer = system)."""
    out = []
    for i, m in enumerate(messages):
        if m.name is not None and m.role != "tool":
            raise APIError(400, f"messages[{i}].name: participant names are not part of the TeleChat2 chat "
                           "template", param=f"messages[{i}].name")
        if m.tool_call_id is not None and m.role != "tool":
            raise APIError(400, f"messages[{i}].tool_call_id: only tool messages answer a tool call",
                           param=f"messages[{i}].tool_call_id")
        if m.tool_calls and m.role != "assistant":
            raise APIError(400, f"messages[{i}].tool_calls: only assistant messages make tool calls",
                           param=f"messages[{i}].tool_calls")
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            msg["tool_calls"] = [{"name": c.function.name, "arguments": c.function.arguments} for c in m.tool_calls]
        out.append(msg)
    return out


def check_tools(tools: list[dict[str, Any]] | None) -> None:
    for i, tool in enumerate(tools or []):
        fn = tool.get("function")
        if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, f"tools[{i}]: expected {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                           param=f"tools[{i}]")


def chat_logprobs(tokenizer, context: list[int], lps: list[TokenLogprob], as_ids: bool = False) -> dict[str, Any]:
    """OpenAI chat logprobs {"content": [{token, logprob, bytes, top_logprobs}]}; context grows in place."""
    def entry(token: int, value: float) -> dict[str, Any]:
        text = token_text(tokenizer, context, token)
        return {"token": f"token_id:{token}" if as_ids else text, "logprob": value,
                "bytes": list(text.encode("utf-8"))}
    content = []
    for lp in lps:
        content.append({**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]})
        context.append(lp.token_id)
    return {"content": content}


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    state = state_of(request)
    check_model(state, req.model)
    reject_unsupported(req)
    check_tools(req.tools)
    prompt = await render_chat(state, template_messages(req.messages), req.tools)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(state, len(prompt), requested, state.generation_config.max_new_tokens,
                                    "messages", field)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(state, req, max_tokens, logprobs)
    sub = submit(state, [prompt] * req.n, [params] * req.n, list(range(req.n)))
    parse = bool(req.tools) and req.tool_choice != "none"
    rid = request_id("chatcmpl")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(state, req, sub, rid, parse, include_usage, prompt),
                                 media_type="text/event-stream")
    try:
        results = await collect(request, sub, req.n)
    except ClientGone:
        return Response(status_code=499)
    choices = []
    for r in results:
        content, calls = (parse_tool_calls(r.text) if parse else (r.text, []))
        if calls and req.parallel_tool_calls is False:
            calls = calls[:1]
        message = {"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in calls]}
        lps = chat_logprobs(state.tokenizer, list(prompt), r.logprobs, req.return_tokens_as_token_ids) \
            if logprobs is not None else None
        choices.append({"index": r.index, "message": message, "logprobs": lps,
                        "finish_reason": "tool_calls" if calls else r.finish_reason, "stop_reason": r.stop_reason})
    body = {"id": rid, "object": "chat.completion", "created": _now(), "model": state.model_name,
            "choices": choices, "usage": usage(len(prompt), sum(r.completion_tokens for r in results))}
    return JSONResponse(body)


def _now() -> int:
    return int(time.time())


async def _stream(state: ServeState, req: ChatCompletionRequest, sub: Submission, rid: str, parse: bool,
                  include_usage: bool, prompt: list[int]) -> AsyncIterator[str]:
    created, n = _now(), req.n

    chunk = chunk_writer(rid, "chat.completion.chunk", created, state.model_name, include_usage)

    filters = [ToolCallStream() for _ in range(n)] if parse else None
    contexts: list[list[int]] = [list(prompt[-4:]) for _ in range(n)]
    prompt_tokens, completion = 0, [0] * n
    for i in range(n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    async for d in sub.updates():
        prompt_tokens, completion[d.index] = d.prompt_tokens, d.completion_tokens
        if d.finish_reason in ("error", "abort"):
            yield sse(error_body(500 if d.finish_reason == "error" else 503, f"generation failed: {d.error}"))
            continue
        text, calls = d.text, []
        if filters is not None:
            text = filters[d.index].feed(text)
            if d.finished:
                rest, calls = filters[d.index].finish()
                text += rest
                if req.parallel_tool_calls is False:
                    calls = calls[:1]
        lps = chat_logprobs(state.tokenizer, contexts[d.index], d.logprobs, req.return_tokens_as_token_ids) \
            if d.logprobs else None
        if not (text or lps or d.finished):
            continue
        delta: dict[str, Any] = {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = [c.to_openai(index=k) for k, c in enumerate(calls)]
        finish = ("tool_calls" if calls else d.finish_reason) if d.finished else None
        yield chunk([{"index": d.index, "delta": delta, "logprobs": lps, "finish_reason": finish,
                      **({"stop_reason": d.stop_reason} if d.finished else {})}])
    if include_usage:
        yield chunk([], usage(prompt_tokens, sum(completion)))
    yield "data: [DONE]\n\n"
