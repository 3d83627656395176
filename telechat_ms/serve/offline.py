"""Offline batch jobs on the serving engine: `generate --input FILE` answers a jsonl file through the PagedEngine,
the same continuous batching, paged kv cache, chunked prefill and prefix cache that `serve` runs, so offline and
online share one path.

Requests are read lazily and kept in flight in a bounded window (a few times the batch): memory is the engine's
(weights + the paged cache + a bounded step), never rows x the longest answer, whatever the file's size; answers
are written in input order as soon as every earlier one is done. Decoding settings come from a GenerationConfig
(the model's generation_config.json and the command line): greedy answers are those of `generate()` for each
prompt; a sampled answer draws from its own Generator seeded with `seed`, i.e. what `generate(seed=...)` draws
for that prompt alone, whatever it is batched with. The cache and budget settings are serve's (ServeConfig,
paged_settings): one source of truth for their defaults.
"""
from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from telechat_ms.errors import DataError
from telechat_ms.infer.batch import Request, read_requests
from telechat_ms.infer.gen_config import GenerationConfig
from telechat_ms.serve.output import Delta
from telechat_ms.serve.paged_engine import PagedEngine
from telechat_ms.serve.sampler import SamplingParams
from telechat_ms.serve.sequence import Sequence
from telechat_ms.serve.server import ServeConfig, paged_settings, paged_stepper_factory

WINDOW_PER_ROW = 4      # requests in flight per engine row (admission and prefix reuse look this far ahead)


def sampling_params(config: GenerationConfig) -> SamplingParams:
    """The engine's SamplingParams of a GenerationConfig (the HF processors in the same order: see sampler.py)."""
    return SamplingParams(max_tokens=config.max_new_tokens, temperature=0.0 if config.greedy else config.temperature,
                          top_p=config.top_p, top_k=config.top_k, repetition_penalty=config.repetition_penalty,
                          seed=config.seed, stop_token_ids=tuple(sorted(config.stop_ids)))


def offline_engine(model, tokenizer, settings: ServeConfig, max_model_len: int, use_jit: bool = True,
                   stepper_factory=None, max_queue: int | None = None, mp: int = 1) -> PagedEngine:
    """A PagedEngine driven from the calling thread (run_once), over this process's model unless a stepper factory
    (num_blocks, block_size) -> PagedStepper is given (mp: its model-parallel degree, for the per-NPU cache
    budget); graphs compile when first used (no warmup)."""
    paged = paged_settings(settings, model.config, max_model_len, mp=mp)
    window = max_queue if max_queue is not None else WINDOW_PER_ROW * settings.max_batch_size
    factory = stepper_factory or paged_stepper_factory(model, use_jit, compile_cache=settings.compile_cache)
    engine = PagedEngine(factory, tokenizer, tokenizer.vocab_size, max_model_len,
                         max_batch_size=settings.max_batch_size, max_queue=window,
                         pad_token_id=model.config.pad_token_id, warmup=False, **paged)
    engine.prepare()
    return engine


def longest_need(tokenizer, requests: Iterable[Request], max_new_tokens: int) -> int:
    """Prompt + answer tokens of the longest request (a first pass over the file: only the number is kept)."""
    longest = 0
    for req in requests:
        if req.error is None:
            longest = max(longest, len(tokenizer.encode(req.prompt)))
    return max(longest + max_new_tokens, 2)


@dataclass(eq=False)
class _Answer:
    """One request's place in the output order and, once the engine is done with it, its result."""

    req: Request
    n_prompt: int = 0
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None
    error: str | None = None

    def take(self, delta: Delta) -> None:
        self.tokens += delta.token_ids
        if delta.finished:
            self.reason, self.error = delta.finish_reason, delta.error
            if delta.finish_reason not in ("stop", "length"):
                self.error = self.error or f"the engine ended the sequence ({delta.finish_reason})"

    @property
    def done(self) -> bool:
        return self.req.error is not None or self.reason is not None


def run_engine_batch(engine: PagedEngine, tokenizer, requests: Iterator[Request],
                     write: Callable[[dict[str, Any]], None], config: GenerationConfig, on_error: str = "skip",
                     progress: Callable[[int], None] | None = None,
                     log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> dict[str, int]:
    """Answer every request through `engine` (driven here, step by step), calling write(record) in input order with
    the records of infer.batch.run_batch; returns counts of answered and bad lines."""
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    params, stop_ids = sampling_params(config), config.stop_ids
    counts = {"answered": 0, "errors": 0, "new_tokens": 0}
    order: deque[_Answer] = deque()    # read and not yet written, in input order: at most `window`
    window = engine.max_queue
    source = iter(requests)
    exhausted = False
    while True:
        while not exhausted and len(order) < window:
            req = next(source, None)
            if req is None:
                exhausted = True
                break
            answer = _Answer(req)
            order.append(answer)
            if req.error is not None:
                if on_error == "fail":
                    raise DataError(req.error)
                log(f"skipped {req.error}")
                continue
            ids = tokenizer.encode(req.prompt)
            answer.n_prompt = len(ids)
            if len(ids) + params.max_tokens > engine.max_model_len:
                answer.req = Request(req.where, req.line_no, req.id, error=f"{req.where}: the prompt has {len(ids)} "
                                     f"tokens: with max_new_tokens {params.max_tokens} it does not fit the "
                                     f"{engine.max_model_len} tokens a sequence may take")
                if on_error == "fail":
                    raise DataError(answer.req.error)
                log(f"skipped {answer.req.error}")
                continue
            engine.submit([Sequence(ids, params, answer.take)])
        while order and order[0].done:
            answer = order.popleft()
            _write(answer, write, counts, stop_ids, tokenizer)
            if progress is not None:
                progress(1)
        if exhausted and not order:
            return counts
        engine.run_once()


def _write(answer: _Answer, write, counts: dict[str, int], stop_ids: set[int], tokenizer) -> None:
    req = answer.req
    error = req.error or answer.error
    if error is not None:
        counts["errors"] += 1
        write({"id": req.id, "line": req.line_no, "error": error})
        return
    new = answer.tokens[:-1] if answer.reason == "stop" and answer.tokens and answer.tokens[-1] in stop_ids \
        else answer.tokens
    record = {"id": req.id, "answer": tokenizer.decode(new, skip_special_tokens=True),
              "finish_reason": answer.reason, "prompt_tokens": answer.n_prompt, "new_tokens": len(new)}
    if req.reference is not None:
        record["reference"] = req.reference
    counts["answered"] += 1
    counts["new_tokens"] += len(new)
    write(record)


def predict_file_paged(model, tokenizer, input_path: str, output_path: str, settings: ServeConfig,
                       config: GenerationConfig, max_model_len: int | None = None, show_progress: bool = True,
                       on_error: str = "skip", use_jit: bool = True, stepper_factory=None,
                       mp: int = 1) -> dict[str, int]:
    """`generate --input`: answer input_path through a PagedEngine into output_path (atomically: a .tmp renamed).
    max_model_len None: the longest request's prompt + max_new_tokens (a first pass over the file)."""
    import json
    import os
    from tqdm import tqdm
    from telechat_ms.infer.batch import count_lines
    if not os.path.isfile(input_path):
        raise DataError(f"{input_path}: input file not found")
    if max_model_len is None:
        max_model_len = longest_need(tokenizer, read_requests(input_path), config.max_new_tokens)
    engine = offline_engine(model, tokenizer, settings, max_model_len, use_jit, stepper_factory, mp=mp)
    tmp = output_path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    bar = tqdm(total=count_lines(input_path), unit="prompt", disable=not show_progress, file=sys.stderr)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            counts = run_engine_batch(engine, tokenizer, read_requests(input_path),
                                      lambda rec: fh.write(json.dumps(rec, ensure_ascii=False) + "\n"), config,
                                      on_error, progress=bar.update, log=lambda msg: bar.write(msg, file=sys.stderr))
        os.replace(tmp, output_path)
    finally:
        bar.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    counts["steps"] = engine.step_count
    return counts
