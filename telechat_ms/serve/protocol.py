"""Request models of the HTTP API (pydantic) and OpenAI-style errors.

Requests follow the OpenAI API as vLLM implements it, vLLM's extra sampling fields included (top_k, min_p,
repetition_penalty, stop_token_ids, ignore_eos, skip_special_tokens). Unknown fields are rejected with a 400 that
names them, and so are known fields whose behaviour is not implemented when they ask for anything but the default:
a parameter either does what it says or the client is told. Errors have the OpenAI shape
{"error": {"message", "type", "param", "code"}} (type and code as vLLM writes them).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class APIError(Exception):
    """An error answered as JSON: status, message, the offending request field (param)."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
             413: "RequestTooLarge", 422: "BadRequestError", 500: "InternalServerError", 503: "ServiceUnavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, err_type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.type = err_type or self.TYPES.get(status, "BadRequestError")

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.type)


def error_body(status: int, message: str, param: str | None = None, err_type: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": err_type or APIError.TYPES.get(status, "BadRequestError"),
                      "param": param, "code": status}}


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


Num = Annotated[float, BeforeValidator(_no_bool)]


class Strict(BaseModel):
    """Fields not declared are an error (named in the 400), never silently ignored."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- chat messages
class FunctionCall(Strict):
    name: StrictStr
    arguments: StrictStr | dict[str, Any] = "{}"


class ToolCallIn(Strict):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: StrictStr | None = None
    # fields OpenAI responses carry; clients send them back with the history; only null is accepted
    refusal: None = None
    audio: None = None
    annotations: None = None
    function_call: None = None
    reasoning_content: None = None

    def text(self) -> str | None:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class StreamOptions(Strict):
    include_usage: StrictBool = False


# ---------------------------------------------------------------------------------------------- requests
class SamplingFields(Strict):
    """Parameters shared by chat and text completions."""

    model: StrictStr | None = None
    temperature: Annotated[Num, Field(ge=0)] | None = None
    top_p: Annotated[Num, Field(gt=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Annotated[Num, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Num, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[str, Annotated[Num, Field(ge=-100, le=100)]] | None = None
    user: StrictStr | None = None   # an end-user id for the client's own bookkeeping; it changes nothing
    # vLLM extras
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[Num, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Num, Field(gt=0)] | None = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    return_tokens_as_token_ids: StrictBool = False   # log-prob tokens as "token_id:N" (byte pieces stay distinct)
    # known, not implemented: accepted only at their defaults (checked in openai_api.reject_unsupported)
    service_tier: StrictStr | None = None
    store: StrictBool | None = None
    metadata: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[StrictStr] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None


TokenIds = list[Annotated[StrictInt, Field(ge=0)]]


class CompletionRequest(SamplingFields):
    prompt: Union[StrictStr, Annotated[TokenIds, Field(min_length=1)],
                  Annotated[list[StrictStr], Field(min_length=1)],
                  Annotated[list[Annotated[TokenIds, Field(min_length=1)]], Field(min_length=1)]]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    suffix: StrictStr | None = None
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None


class GenerateMessage(Strict):
    role: Literal["system", "user", "assistant", "bot"]
    content: StrictStr


class GenerateRequest(Strict):
    """The released server's /generate body (spec section 8), with its defaults."""

    messages: Annotated[list[GenerateMessage], Field(min_length=1)]
    do_sample: StrictBool = False
    temperature: Annotated[Num, Field(gt=0)] = 1.0
    repetition_penalty: Annotated[Num, Field(gt=0)] = 1.0
    top_p: Annotated[Num, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=0)] = 1
    max_length: Annotated[StrictInt, Field(ge=1)] = 512
    stream: StrictBool = False


class TokenizeRequest(Strict):
    """vLLM's /tokenize: a text prompt, or chat messages rendered with the chat template."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = True   # TeleChat2 adds no BOS/EOS either way (spec 4)
    return_token_strs: StrictBool = False


class DetokenizeRequest(Strict):
    model: StrictStr | None = None
    tokens: TokenIds
