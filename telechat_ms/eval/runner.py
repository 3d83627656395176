"""`telechat-ms eval`: load each task's samples, score them (log-likelihoods batched on the model; generation through
the engine; programs in the sandbox), keep every finished sample in OUT/progress/TASK.jsonl as it goes (so --resume
picks up where a crash stopped and the final results are identical), then write the table and the sample logs."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from telechat_ms.errors import ConfigError
from telechat_ms.eval import report
from telechat_ms.eval.generation import GenRequest, generate_greedy
from telechat_ms.eval.sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT, run_programs
from telechat_ms.eval.scoring import LoglikelihoodScorer, encode_pair
from telechat_ms.eval.tasks import CHAT_TASKS, PERPLEXITY, TASKS, Metric, Sample, resolve
from telechat_ms.eval.tasks import code as code_task
from telechat_ms.eval.tasks.judged import chat_prompt
from telechat_ms.io import atomic_write_text

LOG_FIELDS = ("task", "doc_id", "prompt", "choices", "loglikelihoods", "generation", "extracted", "pred", "target",
              "correct")


@dataclass
class EvalModel:
    """What evaluation needs of a model: its tokenizer, the batched scorer, an engine for generation (built on first
    use), the model itself (held-out loss) and the size whose published scores the table shows."""

    name: str
    tokenizer: Any
    scorer: LoglikelihoodScorer
    make_engine: Callable[[], Any]
    stop_ids: tuple[int, ...]
    model: Any = None
    size: str | None = None
    _engine: Any = None

    @property
    def engine(self):
        if self._engine is None:
            self._engine = self.make_engine()
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


@dataclass
class EvalOptions:
    """The flags of `telechat-ms eval`."""

    tasks: list[str]
    data_dir: str
    output: str
    num_fewshot: int | None = None
    limit: int | None = None
    log_samples: bool = False
    resume: bool = False
    allow_code_execution: bool = False
    code_timeout: float = DEFAULT_TIMEOUT
    code_memory_mb: int = DEFAULT_MEMORY_MB
    progress: bool = True
    max_gen_toks: int | None = None     # caps every task's generation budget
    chunk: int = 64                     # samples per persisted step
    rank: int = 0                       # data-parallel replicas: this one scores doc_id % world == rank
    world: int = 1
    prompt_style: str = "loglikelihood"  # multiple choice: "loglikelihood" of each choice, or "chat" (a letter)
    gather: Callable[[list], list] | None = None   # world > 1: every replica's records (eval/dp.gather_records)
    extra: dict[str, Any] = field(default_factory=dict)


def _progress_path(opts: EvalOptions, task: str) -> str:
    suffix = f".rank{opts.rank}" if opts.world > 1 else ""
    return os.path.join(opts.output, "progress", f"{task}{suffix}.jsonl")


def _read_progress(path: str, samples: list[Sample]) -> dict[int, dict[str, Any]]:
    by_id = {s.doc_id: s for s in samples}
    done: dict[int, dict[str, Any]] = {}
    if not os.path.isfile(path):
        return done
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break                       # the line a crash cut short: everything before it stands
            s = by_id.get(rec.get("doc_id"))
            if s is None or rec.get("prompt") != s.prompt:
                raise ConfigError(f"{path}:{n}: --resume: this record does not belong to this run (task, data, "
                                  "--num-fewshot or --limit changed); use another --output or drop --resume")
            done[s.doc_id] = rec
    return done


class _Progress:
    def __init__(self, total: int, done: int, task: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, desc=task, unit="sample", file=sys.stderr, mininterval=1.0,
                            dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _score_mc(em: EvalModel, samples: list[Sample]) -> list[dict[str, Any]]:
    enc = em.tokenizer.encode
    requests, owner = [], []
    for s in samples:
        for choice in s.choices or []:
            requests.append(encode_pair(enc, s.prompt, choice))
            owner.append(s.doc_id)
    scores = em.scorer.score(requests)
    results: dict[int, list[float]] = {}
    for doc_id, (ll, _) in zip(owner, scores):
        results.setdefault(doc_id, []).append(ll)
    return [{"loglikelihoods": results[s.doc_id], "generation": None} for s in samples]


def _generate(em: EvalModel, samples: list[Sample], cap: int | None = None) -> list[dict[str, Any]]:
    enc = em.tokenizer.encode

    def budget(s: Sample) -> int:
        return s.max_gen_toks if cap is None else min(cap, s.max_gen_toks)
    if samples and samples[0].turns is not None:            # multi-turn (MT-bench)
        answers: list[list[str]] = [[] for _ in samples]
        for turn in range(max(len(s.turns or []) for s in samples)):
            idx = [i for i, s in enumerate(samples) if turn < len(s.turns or [])]
            reqs = [GenRequest(enc(chat_prompt(samples[i].turns, answers[i])), samples[i].until,
                               budget(samples[i])) for i in idx]
            for i, text in zip(idx, generate_greedy(em.engine, reqs, em.stop_ids)):
                answers[i].append(text)
        return [{"loglikelihoods": None, "generation": a} for a in answers]
    reqs = [GenRequest(enc(s.prompt), s.until, budget(s)) for s in samples]
    texts = generate_greedy(em.engine, reqs, em.stop_ids)
    return [{"loglikelihoods": None, "generation": t} for t in texts]


def _run_chunk(em: EvalModel, spec, samples: list[Sample], opts: EvalOptions) -> list[dict[str, Any]]:
    results = _score_mc(em, samples) if spec.kind == "multiple_choice" else _generate(em, samples, opts.max_gen_toks)
    if spec.kind == "code":
        programs = [code_task.program(s, r["generation"])[1] for s, r in zip(samples, results)]
        for r, run in zip(results, run_programs(programs, opts.code_timeout, opts.code_memory_mb)):
            r["execution"] = run
    records = []
    for s, r in zip(samples, results):
        scored = spec.score(s, r)
        rec = {"task": s.task, "doc_id": s.doc_id, "prompt": s.prompt, "choices": s.choices,
               "loglikelihoods": r["loglikelihoods"], "generation": r["generation"], "extracted": None,
               "pred": None, "target": s.target, "correct": None, "subject": s.subject}
        rec.update({k: v for k, v in scored.items()})
        records.append(rec)
    return records


PROMPT_STYLES = ("loglikelihood", "chat")


def spec_for(name: str, opts: EvalOptions):
    """The TaskSpec that scores `name` under these options (--prompt-style chat: the exams' generated letter)."""
    if opts.prompt_style == "chat" and name in CHAT_TASKS:
        return CHAT_TASKS[name]
    return TASKS[name]


def check_tasks(names: list[str], opts: EvalOptions) -> None:
    """Refuse up front what a task cannot do with these flags (before any model work)."""
    if opts.world > 1 and PERPLEXITY in names:
        raise ConfigError("--tasks perplexity under data-parallel replicas: run it in one process (its batches are "
                          "not split across replicas)")
    if opts.world > 1 and opts.gather is None:
        raise ConfigError("data-parallel replicas need a gather of the records (eval/dp.gather_records)")
    if opts.prompt_style not in PROMPT_STYLES:
        raise ConfigError(f"--prompt-style must be one of {', '.join(PROMPT_STYLES)}, got {opts.prompt_style!r}")
    if opts.prompt_style == "chat" and not any(n in CHAT_TASKS for n in names):
        raise ConfigError(f"--prompt-style chat applies to the multiple-choice tasks ({', '.join(CHAT_TASKS)}); "
                          f"--tasks has none of them")
    for name in names:
        if name != PERPLEXITY and TASKS[name].kind == "code" and not opts.allow_code_execution:
            raise ConfigError(f"--tasks {name} runs the programs the model writes: add --allow-code-execution (each "
                              "program runs in a subprocess with a timeout, CPU and memory limits; use a container "
                              "for untrusted models)")
    if opts.limit is not None and opts.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {opts.limit}")
    if opts.max_gen_toks is not None and opts.max_gen_toks < 1:
        raise ConfigError(f"--max-gen-toks must be >= 1, got {opts.max_gen_toks}")
    if opts.num_fewshot is not None and opts.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {opts.num_fewshot}")


def run_task(em: EvalModel, name: str, opts: EvalOptions) -> tuple[list[Metric], list[dict[str, Any]]]:
    """Score one task (resuming from its progress file when asked); its metrics and its records in doc order."""
    spec = spec_for(name, opts)
    k = spec.default_fewshot if opts.num_fewshot is None else opts.num_fewshot
    samples = spec.load(opts.data_dir, k)
    if opts.limit is not None:
        samples = samples[:opts.limit]
    mine = [s for s in samples if s.doc_id % opts.world == opts.rank]
    path = _progress_path(opts, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    done = _read_progress(path, mine) if opts.resume else {}
    with open(path, "w", encoding="utf-8") as fh:     # rewritten with what stands (drops a torn last line)
        for rec in done.values():
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    todo = [s for s in mine if s.doc_id not in done]
    bar = _Progress(len(mine), len(mine) - len(todo), name, opts.progress)
    try:
        with open(path, "a", encoding="utf-8") as fh:
            for start in range(0, len(todo), opts.chunk):
                for rec in _run_chunk(em, spec, todo[start:start + opts.chunk], opts):
                    done[rec["doc_id"]] = rec
                    fh.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                bar.update(min(opts.chunk, len(todo) - start))
    finally:
        bar.close()
    records = [done[s.doc_id] for s in mine]
    if opts.world > 1:                 # data-parallel replicas: every one aggregates all samples in doc order
        by_id = {r["doc_id"]: r for r in opts.gather(records)}
        mine, records = samples, [by_id[s.doc_id] for s in samples]
    return spec.aggregate(mine, records), records


def run_perplexity(em: EvalModel, opts: EvalOptions, batch_size: int) -> list[Metric]:
    """Token-mean NLL over a process-data MindRecord dir (--data-dir), by training's own held-out loss."""
    from telechat_ms.train import evaluate as train_eval
    res = train_eval.heldout_loss(em.model, opts.data_dir, batch_size, max_steps=opts.limit)
    n = int(res["tokens"])
    return [Metric(PERPLEXITY, "loss", float(res["loss"]), n), Metric(PERPLEXITY, "perplexity",
                                                                       float(res["perplexity"]), n)]


def _write_side_files(opts: EvalOptions, em: EvalModel, name: str, records: list[dict[str, Any]],
                      samples_by_id: dict[int, Sample] | None = None) -> list[str]:
    written = []
    if opts.log_samples:
        path = os.path.join(opts.output, f"samples_{name}.jsonl")
        atomic_write_text(path, "".join(json.dumps({k: r.get(k) for k in LOG_FIELDS}, ensure_ascii=False,
                                                   default=str) + "\n" for r in records))
        written.append(path)
    if name in ("mt_bench", "alignbench"):
        written.append(_judge_answers(opts, em, name, records))
    return written


def _judge_answers(opts: EvalOptions, em: EvalModel, name: str, records: list[dict[str, Any]]) -> str:
    """Answers in the judge's input format (see tasks/judged.py)."""
    model_id = os.path.basename(os.path.normpath(em.name)) or "telechat_ms"
    path = os.path.join(opts.output, name, "model_answer", f"{model_id}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    spec, lines = TASKS[name], []
    samples = {s.doc_id: s for s in spec.load(opts.data_dir, 0)}
    for r in records:
        s = samples[r["doc_id"]]
        if name == "mt_bench":
            obj = {"question_id": s.doc["question_id"], "answer_id": f"{s.doc['question_id']}_{model_id}",
                   "model_id": model_id, "choices": [{"index": 0, "turns": r["generation"]}], "tstamp": time.time()}
        else:
            obj = dict(s.doc, model_id=model_id, answer_id=f"{s.doc['question_id']}_{model_id}",
                       answer=r["generation"])
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    atomic_write_text(path, "".join(lines))
    return path


def run_eval(em: EvalModel, opts: EvalOptions, batch_size: int = 8) -> dict[str, Any]:
    """Every task of opts; writes OUT/results.{json,md} (+ samples_TASK.jsonl, judge answer files); returns the
    JSON payload. Data-parallel replicas (opts.world > 1) each score their share; rank 0 writes."""
    names = resolve(opts.tasks)
    check_tasks(names, opts)
    metrics: list[Metric] = []
    files: list[str] = []
    for name in names:
        if name == PERPLEXITY:
            metrics += run_perplexity(em, opts, batch_size)
            continue
        task_metrics, records = run_task(em, name, opts)
        if spec_for(name, opts).kind != "multiple_choice":
            em.close()        # the engine thread ends before the next task steps the model from this thread
        metrics += task_metrics
        if opts.rank == 0:
            files += _write_side_files(opts, em, name, records)
    primary = {n: (TASKS[n].published, TASKS[n].primary) for n in names if n in TASKS}
    rows = report.rows_with_published(metrics, primary, em.size)
    payload = {"model": em.name, "size": em.size, "results": rows,
               "config": {"tasks": names, "num_fewshot": opts.num_fewshot, "limit": opts.limit,
                          "prompt_style": opts.prompt_style,
                          "batch_size": batch_size, "data_dir": opts.data_dir}, "files": files}
    if opts.rank != 0:                 # rank 0 writes the one report
        return payload
    json_path, md_path = report.write_results(opts.output, payload, report.markdown(rows, em.name, em.size))
    payload["files"] = files + [json_path, md_path]
    return payload
