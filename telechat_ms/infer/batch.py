"""Batch prediction over a jsonl file of conversations: `telechat-ms generate --input in.jsonl --output out.jsonl`.

Input lines (the chat-template message format, or the released / MindSpore-port record shapes):
  {"id": ..., "messages": [{"role": "system"|"user"|"assistant"|"bot"|"tool", "content": ...}], "tools": [...]}
  {"id": ..., "system": ..., "dialog": [{"role": "user"|"bot", "content": ...}, ...]}
  {"id": ..., "prompt": "..."}  or  {"id": ..., "input": "...", "system": ...}
A conversation that ends with an assistant turn is answered without it, and that turn is kept as "reference".
Output lines keep the input order; the id is the record's "id" or, without one, its line number. A malformed line
is reported as file:line and either stops the run (--on-error fail) or gives an {"id", "error"} line (skip).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from telechat_ms.chat_template import ROLE_ALIASES, apply_chat_template
from telechat_ms.errors import DataError
from telechat_ms.infer.gen_config import GenerationConfig
from telechat_ms.infer.generate import generate


@dataclass
class Request:
    """One input line: where it came from, its id, the prompt text (or the error that makes it unusable)."""

    where: str
    line_no: int
    id: Any
    prompt: str | None = None
    reference: str | None = None
    error: str | None = None


def _messages_of(record: dict[str, Any], where: str) -> tuple[list[dict[str, Any]], Any]:
    """(messages, tools) of a record in any accepted shape; DataError names file:line and the field."""
    if "messages" in record:
        messages, tools = record["messages"], record.get("tools")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: messages: expected a non-empty list")
        if tools is not None and not isinstance(tools, list):
            raise DataError(f"{where}: tools: expected a list")
        return [dict(m) if isinstance(m, dict) else m for m in messages], tools
    system = record.get("system")
    head = [] if system is None else [{"role": "system", "content": system.removesuffix("\n")
                                       if isinstance(system, str) else system}]
    if "dialog" in record:
        dialog = record["dialog"]
        if not isinstance(dialog, list) or not dialog:
            raise DataError(f"{where}: dialog: expected a non-empty list")
        return head + [dict(t) if isinstance(t, dict) else t for t in dialog], None
    for key in ("prompt", "input", "question"):
        if key in record:
            return head + [{"role": "user", "content": record[key]}], None
    raise DataError(f"{where}: expected a field 'messages', 'dialog', 'prompt' or 'input'")


def parse_request(line: str, where: str, line_no: int) -> Request:
    """Decode one jsonl line into a Request (never raises: the error is kept on the request)."""
    record_id: Any = line_no
    try:
        try:
            record = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        record_id = record.get("id", line_no)
        messages, tools = _messages_of(record, where)
        reference = None
        last = messages[-1]
        if isinstance(last, dict) and ROLE_ALIASES.get(last.get("role")) == "assistant":
            reference = last.get("content")
            messages = messages[:-1]
            if not messages or all(isinstance(m, dict) and m.get("role") == "system" for m in messages):
                raise DataError(f"{where}: nothing to answer before the final assistant turn")
        try:
            prompt = apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
        return Request(where, line_no, record_id, prompt, reference)
    except DataError as exc:
        return Request(where, line_no, record_id, error=str(exc))


def read_requests(path: str) -> Iterator[Request]:
    """Requests of a jsonl file in order (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if line.strip():
                yield parse_request(line, f"{path}:{line_no}", line_no)


def _batches(requests: Iterator[Request], size: int) -> Iterator[list[Request]]:
    batch: list[Request] = []
    for req in requests:
        batch.append(req)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_batch(model, tokenizer, requests: Iterator[Request], write: Callable[[dict[str, Any]], None],
              generation_config: GenerationConfig | None = None, batch_size: int = 1, on_error: str = "skip",
              use_jit: bool = True, progress: Callable[[int], None] | None = None,
              log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr), **options: Any) -> dict[str, int]:
    """Answer every request, calling write(record) in input order; returns counts of answered and bad lines."""
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    counts = {"answered": 0, "errors": 0, "new_tokens": 0}
    for batch in _batches(requests, max(1, batch_size)):
        good = [r for r in batch if r.error is None]
        for r in batch:
            if r.error is not None:
                if on_error == "fail":
                    raise DataError(r.error)
                log(f"skipped {r.error}")
        answers: dict[int, tuple[str, str, int, int]] = {}
        if good:
            rows = [tokenizer.encode(r.prompt) for r in good]
            out = generate(model, rows, generation_config, use_jit=use_jit, **options)
            for r, row, new, reason in zip(good, rows, out.new_tokens, out.finish_reasons):
                answers[id(r)] = (tokenizer.decode(new, skip_special_tokens=True), reason, len(row), len(new))
        for r in batch:
            if r.error is not None:
                counts["errors"] += 1
                write({"id": r.id, "line": r.line_no, "error": r.error})
                continue
            answer, reason, n_prompt, n_new = answers[id(r)]
            record = {"id": r.id, "answer": answer, "finish_reason": reason, "prompt_tokens": n_prompt,
                      "new_tokens": n_new}
            if r.reference is not None:
                record["reference"] = r.reference
            counts["answered"] += 1
            counts["new_tokens"] += n_new
            write(record)
        if progress is not None:
            progress(len(batch))
    return counts


def count_lines(path: str) -> int:
    """Non-blank lines of a file (the progress bar's total)."""
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def predict_file(model, tokenizer, input_path: str, output_path: str, show_progress: bool = True,
                 **kwargs: Any) -> dict[str, int]:
    """run_batch over input_path, writing output_path atomically (a .tmp file renamed at the end)."""
    from tqdm import tqdm
    if not os.path.isfile(input_path):
        raise DataError(f"{input_path}: input file not found")
    tmp = output_path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    bar = tqdm(total=count_lines(input_path), unit="prompt", disable=not show_progress, file=sys.stderr)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            counts = run_batch(model, tokenizer, read_requests(input_path),
                               lambda rec: fh.write(json.dumps(rec, ensure_ascii=False) + "\n"),
                               progress=bar.update, log=lambda msg: bar.write(msg, file=sys.stderr), **kwargs)
        os.replace(tmp, output_path)
    finally:
        bar.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    return counts


def init_workers() -> tuple[int, int]:
    """(rank, size) after initialising MindSpore communication (msrun data-parallel predict)."""
    from mindspore.communication import get_group_size, get_rank, init
    init()
    return get_rank(), get_group_size()


def barrier() -> None:
    """Wait for every worker: an AllReduce of one number (the Barrier op has no CPU kernel)."""
    import numpy as np
    import mindspore as ms
    from mindspore import ops
    ops.AllReduce()(ms.Tensor(np.ones(1, np.float32))).asnumpy()


def predict_file_data_parallel(model, tokenizer, input_path: str, output_path: str, rank: int, size: int,
                               **kwargs: Any) -> dict[str, int] | None:
    """Each msrun worker answers lines rank, rank+size, ...; rank 0 merges the parts back into input order and
    returns the counts (the other ranks return None)."""
    part = f"{output_path}.part{rank}"
    requests = (r for i, r in enumerate(read_requests(input_path)) if i % size == rank)
    with open(part + ".tmp", "w", encoding="utf-8") as fh:
        run_batch(model, tokenizer, requests, lambda rec: fh.write(json.dumps(rec, ensure_ascii=False) + "\n"),
                  **kwargs)
    os.replace(part + ".tmp", part)
    barrier()
    if rank != 0:
        return None
    parts = [open(f"{output_path}.part{r}", encoding="utf-8") for r in range(size)]
    total = {"answered": 0, "errors": 0, "new_tokens": 0}
    with open(output_path + ".tmp", "w", encoding="utf-8") as out:
        done = False
        while not done:
            done = True
            for fh in parts:
                line = fh.readline()
                if line:
                    done = False
                    rec = json.loads(line)
                    total["errors" if "error" in rec else "answered"] += 1
                    total["new_tokens"] += rec.get("new_tokens", 0)
                    out.write(line)
    for r, fh in enumerate(parts):
        fh.close()
        os.remove(f"{output_path}.part{r}")
    os.replace(output_path + ".tmp", output_path)
    return total
