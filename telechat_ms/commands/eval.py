"""`eval`: the release's benchmark table from a MindSpore checkpoint; `harness`: lm-eval's own CLI with the
`telechat_ms` model registered."""
from __future__ import annotations

import argparse
import json
import sys


def _eval(args: argparse.Namespace) -> int:
    from telechat_ms.errors import ConfigError
    from telechat_ms.eval.runner import EvalOptions, run_eval
    from telechat_ms.eval.tasks import resolve
    names = resolve(args.tasks)        # a bad --tasks fails before the model loads
    if not args.data_dir:
        raise ConfigError("--data-dir is required: the benchmarks' official files under DIR/<task>/, or the "
                          "MindRecord dir of --tasks perplexity")
    opts = EvalOptions(tasks=names, data_dir=args.data_dir, output=args.output, num_fewshot=args.num_fewshot,
                       limit=args.limit, log_samples=args.log_samples, resume=args.resume,
                       allow_code_execution=args.allow_code_execution, code_timeout=args.code_timeout,
                       code_memory_mb=args.code_memory_mb, progress=not args.no_progress,
                       max_gen_toks=args.max_gen_toks, prompt_style=args.prompt_style)
    from telechat_ms.eval.runner import check_tasks
    check_tasks(names, opts)
    if args.config:
        from telechat_ms.parallel.predict_job import load_predict_job, reject_flags
        reject_flags([(args.model_dir, "MODEL_DIR", "load_checkpoint"),
                      (args.data_parallel, "--data-parallel", "parallel.parallel_mode"),
                      (args.device_target, "--device-target", "context.device_target"),
                      (args.max_model_len, "--max-model-len", "model.model_config.seq_length")])
        job = load_predict_job(args.config, args.overrides)
        if job.parallel.parallel_mode == "data_parallel":
            raise ConfigError(f"{job.source}: parallel.parallel_mode data_parallel: data-parallel eval replicas run "
                              "from a model directory: run_scripts/msrun_eval.sh WORKERS MODEL_DIR --tasks ... "
                              "(telechat-ms eval MODEL_DIR --data-parallel under msrun)")
        if job.model_parallel:
            return _eval_model_parallel(job, opts, args)
        model_dir, max_len, batch = job.load_checkpoint, job.model_config.seq_length, job.batch_size
    else:
        if args.overrides:
            raise ConfigError(f"{args.overrides[0]}: --key.path=value overrides need --config PREDICT.yaml")
        if not args.model_dir:
            raise ConfigError("give MODEL_DIR or --config PREDICT.yaml")
        model_dir, max_len, batch = args.model_dir, args.max_model_len, args.batch_size
    from telechat_ms.serve.server import set_runtime
    set_runtime(args.device_target, args.cpu_threads)
    if args.data_parallel:             # communication after the device: on Ascend it binds each worker to its own
        from telechat_ms.eval.dp import gather_records, init_replicas
        opts.rank, opts.world = init_replicas()
        opts.gather = lambda records: gather_records(records, opts.world)
        check_tasks(names, opts)
    from telechat_ms.eval.model import load_eval_model
    em = load_eval_model(model_dir, args.tokenizer, batch, max_len, use_jit=args.jit, size=args.size)
    try:
        payload = run_eval(em, opts, batch)
    finally:
        em.close()
    if opts.rank != 0:                 # a data-parallel replica: rank 0 prints and writes the report
        return 0
    md = payload["files"][-1]
    with open(md, encoding="utf-8") as fh:
        print(fh.read(), end="")
    print(json.dumps({"results": payload["files"][-2]}), file=sys.stderr)
    return 0


def _eval_model_parallel(job, opts, args) -> int:
    """Model parallel under msrun: every rank builds its shard; rank 0 runs the evaluation through the leader
    stepper (scoring by prefill steps, generation by the engine over it) while the others replay its steps."""
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    from telechat_ms.eval.model import stepper_eval_model
    from telechat_ms.eval.runner import run_eval
    from telechat_ms.parallel.predict import build_model_parallel, run_lockstep
    session = build_model_parallel(job, use_jit=args.jit)

    def work(model, leader) -> int:
        tok = TeleChatTokenizer.for_model(args.tokenizer or job.load_checkpoint, model.config.vocab_size)
        em = stepper_eval_model(model, tok, job.load_checkpoint, leader, on_idle=leader.keepalive, size=args.size)
        try:
            payload = run_eval(em, opts, leader.batch)
        finally:
            em.close()
        with open(payload["files"][-1], encoding="utf-8") as fh:
            print(fh.read(), end="")
        return 0
    result = run_lockstep(session, work)
    return 0 if result is None else result


def _harness(args: argparse.Namespace) -> int:
    from telechat_ms.eval.harness import run_cli
    return run_cli(list(args.lm_eval_args))


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add eval and harness."""
    p = subparsers.add_parser(
        "eval", allow_abbrev=False, help="benchmark a checkpoint (C-Eval, MMLU, CMMLU, GSM8K, HumanEval, MBPP, BBH, "
        "IFEval, MT-bench / AlignBench answers, held-out perplexity)",
        description="Score a checkpoint on benchmarks read from their official release layouts under "
                    "--data-dir/<task>/ (docs/eval.md), with lm-eval 0.4.13's prompts; writes OUT/results.md and "
                    "results.json beside the published scores of the evaluated size.")
    p.add_argument("model_dir", nargs="?", default=None, help="checkpoint directory with tokenizer.model")
    p.add_argument("--config", default=None, help="predict YAML instead of MODEL_DIR (load_checkpoint, "
                   "runner_config.batch_size, model.model_config.seq_length): one process, or model parallel under "
                   "msrun (run_scripts/msrun_predict.sh CONFIG eval ...); --key.path=value overrides")
    p.add_argument("--tasks", required=True, help="comma-separated: ceval,mmlu,cmmlu,gsm8k,humaneval,mbpp,bbh,"
                   "ifeval,mt_bench,alignbench,perplexity")
    p.add_argument("--data-dir", default=None, help="DIR holding <task>/ in each benchmark's release layout; for "
                   "perplexity a process-data MindRecord directory")
    p.add_argument("--num-fewshot", type=int, default=None, help="shots per prompt (default: the task's: 5 for "
                   "C-Eval/MMLU/CMMLU/GSM8K, 3 for BBH/MBPP, 0 otherwise)")
    p.add_argument("--limit", type=int, default=None, help="the first N samples of each task (perplexity: N batches)")
    p.add_argument("--max-gen-toks", type=int, default=None, help="cap on generated tokens per sample (default: the "
                   "task's: 256 GSM8K, 1024 BBH/HumanEval/MT-bench, 512 MBPP, 1280 IFEval)")
    p.add_argument("--prompt-style", default="loglikelihood", choices=["loglikelihood", "chat"],
                   help="multiple choice (C-Eval/MMLU/CMMLU): log-likelihood of each choice (default, lm-eval's), or "
                   "chat: the question through the chat template, the answer letter generated greedily")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward and engine rows (default 8; after a "
                   "subject's shared exemplars, as many rows as hold the same tokens, at most 8x)")
    p.add_argument("--output", default="eval_out", help="output directory (default ./eval_out)")
    p.add_argument("--log-samples", action="store_true", help="write OUT/samples_TASK.jsonl, one line per sample")
    p.add_argument("--resume", action="store_true", help="keep the samples OUT/progress/ already holds")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run HumanEval/MBPP programs (subprocess, timeout, CPU + memory limits, temp dir)")
    p.add_argument("--code-timeout", type=float, default=10.0, help="seconds per program (default 10)")
    p.add_argument("--code-memory-mb", type=int, default=1024, help="address-space limit per program (default 1024)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or its directory (default: MODEL_DIR)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: seq_length)")
    p.add_argument("--size", default=None, choices=["3b", "7b", "35b", "39b-a12b", "115b"],
                   help="whose published scores to show (default: from the model's shape)")
    p.add_argument("--jit", action="store_true", help="compile the engine's steps (graph mode) for generation")
    p.add_argument("--cpu-threads", type=int, default=None, help="CPU kernel threads")
    p.add_argument("--data-parallel", action="store_true", help="under msrun (run_scripts/msrun_eval.sh): every "
                   "worker a full replica scoring samples doc_id %% workers == rank; rank 0 gathers the records "
                   "and writes the one report a single process writes")
    p.add_argument("--device-target", default=None, choices=["Ascend", "CPU", "GPU"],
                   help="MindSpore device (default: MindSpore's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval, takes_overrides=True, overrides=[])

    h = subparsers.add_parser(
        "harness", allow_abbrev=False, add_help=False, help="lm-eval's CLI with the telechat_ms model registered",
        description="Run lm-evaluation-harness (0.4.13) with `--model telechat_ms --model_args pretrained=DIR` (or "
                    "config=PREDICT.yaml); every argument goes to lm-eval (try: telechat-ms harness --help).")
    h.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments")
    h.set_defaults(func=_harness)
