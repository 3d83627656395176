"""From an OpenAI request to SamplingParams: the model's generation_config.json fills what the request leaves out,
and parameters whose behaviour is not implemented are refused (400 naming them) unless they ask for the default.

Defaults (as vLLM's `--generation-config auto`): temperature, top_p, top_k and repetition_penalty come from the
model's generation_config.json; a model whose config says do_sample false answers greedily unless the request sets
a temperature. Stop ids: the config's eos_token_id(s) (dropped by ignore_eos) plus the request's stop_token_ids.
"""
from __future__ import annotations

from typing import Any

from telechat_ms.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields
from telechat_ms.serve.sampler import SamplingParams
from telechat_ms.serve.state import ServeState, check_token_ids


def _refuse(name: str, why: str) -> None:
    raise APIError(400, f"{name}: {why}", param=name)


def reject_unsupported(req: SamplingFields) -> None:
    """400 for known parameters whose non-default behaviour this server does not implement."""
    if req.service_tier not in (None, "auto", "default"):
        _refuse("service_tier", f"{req.service_tier!r} is not supported (only 'auto' / 'default')")
    if req.store:
        _refuse("store", "storing completions is not supported")
    if req.metadata:
        _refuse("metadata", "metadata is only used with store, which is not supported")
    if isinstance(req, ChatCompletionRequest):
        if req.functions is not None or req.function_call is not None:
            _refuse("functions" if req.functions is not None else "function_call",
                    "the deprecated functions API is not supported; use tools")
        if req.response_format not in (None, {"type": "text"}):
            _refuse("response_format", "only {\"type\": \"text\"} is supported (no constrained decoding)")
        if req.tool_choice not in (None, "none", "auto"):
            _refuse("tool_choice", "only 'auto' and 'none' are supported (forcing a call needs constrained "
                    "decoding)")
        if req.modalities not in (None, ["text"]):
            _refuse("modalities", "only text output is supported")
        for name in ("audio", "prediction", "reasoning_effort"):
            if getattr(req, name) is not None:
                _refuse(name, "not supported by this server")
        if req.top_logprobs is not None and not req.logprobs:
            _refuse("top_logprobs", "needs logprobs: true")
    if isinstance(req, CompletionRequest):
        if req.suffix is not None:
            _refuse("suffix", "insertion (suffix) is not supported by TeleChat2")
        if req.best_of is not None and req.best_of != req.n:
            _refuse("best_of", "best_of other than n is not supported")


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not s for s in stops):
        _refuse("stop", "stop strings must not be empty")
    return stops


def _logit_bias(state: ServeState, bias: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            _refuse("logit_bias", f"keys must be token ids, got {key!r}")
        if not 0 <= token < state.vocab_size:
            _refuse("logit_bias", f"token id {token} is outside the vocabulary (size {state.vocab_size})")
        out[token] = float(value)
    return out


def sampling_params(state: ServeState, req: SamplingFields, max_tokens: int, logprobs: int | None,
                    **overrides: Any) -> SamplingParams:
    """SamplingParams of one request, defaults from the model's generation config."""
    gen = state.generation_config
    temperature = req.temperature if req.temperature is not None else (gen.temperature if gen.do_sample else 0.0)
    top_k = gen.top_k if req.top_k is None else (0 if req.top_k == -1 else req.top_k)
    stop_ids = set(req.stop_token_ids or [])
    check_token_ids(state, sorted(stop_ids), "stop_token_ids")
    if not req.ignore_eos:
        stop_ids |= gen.stop_ids
    params = dict(
        max_tokens=max_tokens, temperature=float(temperature),
        top_p=float(gen.top_p if req.top_p is None else req.top_p), top_k=int(top_k),
        min_p=float(req.min_p or 0.0),
        repetition_penalty=float(gen.repetition_penalty if req.repetition_penalty is None
                                 else req.repetition_penalty),
        presence_penalty=float(req.presence_penalty), frequency_penalty=float(req.frequency_penalty),
        logit_bias=_logit_bias(state, req.logit_bias), seed=req.seed, stop=_stop_strings(req.stop),
        stop_token_ids=tuple(sorted(stop_ids)), logprobs=logprobs, skip_special_tokens=req.skip_special_tokens)
    params.update(overrides)
    return SamplingParams(**params)
