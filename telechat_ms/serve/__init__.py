"""Serving: an OpenAI-compatible HTTP server (plus the released /generate API) over a continuous-batching engine.

engine (one thread owns the model; admit / step / evict / cancel over per-row kv-cache slots), async_engine (the
event-loop side), protocol (request models, errors), params, sampler, output (text + stop strings), tool_parser,
metrics (Prometheus), openai_chat / openai_completions / released (routes), app (FastAPI), server (loading, uvicorn).
Importing this package imports neither FastAPI nor MindSpore.
"""
