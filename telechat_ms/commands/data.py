"""`process-data` and `train-tokenizer`: training data in MindRecord shards, and a small demo tokenizer."""
from __future__ import annotations

import argparse
import os


def _process_data(args: argparse.Namespace) -> int:
    """Run process-data (or only its final step) from parsed arguments; prints the summary; returns an exit code."""
    from telechat_ms.data.process import ProcessOptions, finalize_output, format_summary, process_data
    from telechat_ms.errors import DataError

    if args.finalize:
        counts = finalize_output(args.finalize, overwrite=args.overwrite)
        print(format_summary(counts))
        print(f"wrote {os.path.abspath(args.finalize)} (manifest.json describes it)")
        return 0
    missing = [f"--{name.replace('_', '-')}" for name in ("data_mix", "tokenizer", "out") if not getattr(args, name)]
    if missing:
        raise DataError(f"the following arguments are required: {', '.join(missing)} (or --finalize OUT)")
    opts = ProcessOptions(
        data_mix=args.data_mix, tokenizer=args.tokenizer, out=args.out, max_seq_len=args.max_seq_len,
        task=args.task, seed=args.seed, num_workers=args.num_workers, on_error=args.on_error,
        loss_mask=args.loss_mask, overlong=args.overlong, pad_side=args.pad_side,
        cross_attention=not args.no_cross_attention, pack=not args.no_pack,
        max_records_per_file=args.max_records_per_file, records_per_shard=args.records_per_shard,
        part_size_mb=args.part_size_mb, num_nodes=args.num_nodes, node_rank=args.node_rank, resume=args.resume,
        overwrite=args.overwrite, progress=not args.no_progress, show_errors=args.show_errors,
        eval_fraction=args.eval_fraction, eval_out=args.eval_out)
    summary = process_data(opts)
    print(format_summary(summary))
    if summary.get("finalized", True):
        print(f"wrote {os.path.abspath(args.out)} (manifest.json describes it)")
    held = summary.get("eval")
    if held is not None:
        print("held-out half (--eval-fraction):\n" + format_summary(held))
        if held.get("finalized", True):
            print(f"wrote {held['out']} (its manifest.json describes it; use it as eval_dataset.data_dir)")
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    """Train the small demo tokenizer; returns an exit code."""
    from telechat_ms.data.train_tokenizer import train_tokenizer

    tok = train_tokenizer(args.out, args.input or None, vocab_size=args.vocab_size, model_type=args.model_type)
    print(f"wrote {os.path.join(args.out, 'tokenizer.model')} ({tok.vocab_size} pieces, sha256 {tok.sha256[:12]})")
    return 0


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add process-data and train-tokenizer."""
    p = subparsers.add_parser(
        "process-data", help="jsonl + data mix -> packed MindRecord shards",
        description="Validate, tokenize, mix, pack and write training data as MindRecord shards + manifest.json. "
                    "The inputs are cut into parts that workers (and nodes) process independently; the output "
                    "directory appears only when every part is done.")
    p.add_argument("--data-mix", help='JSON {"file.jsonl": weight} (paths relative to it), or a single .jsonl file')
    p.add_argument("--tokenizer", help="tokenizer.model or a directory containing it")
    p.add_argument("--out", help="output directory (appears only when complete)")
    p.add_argument("--max-seq-len", type=int, default=8192)
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="worker processes, each taking whole parts; the output is identical for any value")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--task", choices=["sft", "pretrain"], default="sft",
                   help="pretrain: documents + <_end> concatenated and cut into full rows (nothing truncated)")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                   help="bad lines: skip and count them (default) or stop with an error")
    p.add_argument("--loss-mask", choices=["released", "answer-only"], default="released",
                   help="released: <_bot>, answer, <_end> and <_user> supervised (TeleChat2 default); "
                        "answer-only: answer + <_end> (the MindSpore port)")
    p.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                   help="SFT records longer than --max-seq-len: keep the start, or drop them (counted either way)")
    p.add_argument("--pad-side", choices=["right", "left"], default="right",
                   help="where the trainer's loader pads the compact rows")
    p.add_argument("--no-cross-attention", action="store_true",
                   help="isolated samples: write position_ids restarting at 0 per sample (each keeps its system "
                        "prompt) so the trainer blocks attention between them, and pack every SFT record first-fit "
                        "(multi-turn and tool records included)")
    p.add_argument("--no-pack", action="store_true", help="SFT: one record per row")
    p.add_argument("--max-records-per-file", type=int, default=None, help="read at most N records per file")
    p.add_argument("--records-per-shard", type=int, default=4096, help="rows per MindRecord file (per part)")
    p.add_argument("--part-size-mb", type=float, default=32.0,
                   help="input bytes per part (the unit of work of a worker; part boundaries change the output)")
    p.add_argument("--num-nodes", type=int, default=1,
                   help="machines sharing the job: each processes the parts with id %% N == --node-rank into the "
                        "same --out (a shared file system); the last to finish writes the manifest")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's rank in [0, --num-nodes)")
    p.add_argument("--resume", action="store_true", help="keep the parts an interrupted run finished")
    p.add_argument("--finalize", metavar="OUT", default=None,
                   help="only the final step: check every part of OUT and write its manifest")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory (and redo or discard an interrupted run)")
    p.add_argument("--eval-fraction", type=float, default=0.0,
                   help="hold out this fraction of the records (a seeded draw per record, fixed by --seed) into a "
                        "second output for do_eval / `telechat-ms eval --tasks perplexity`; the two halves share "
                        "no record, and each has its manifest")
    p.add_argument("--eval-out", default=None, help="the held-out half's directory (default: <--out>_eval)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--show-errors", type=int, default=5, help="how many bad lines to print")
    p.set_defaults(func=_process_data)

    t = subparsers.add_parser(
        "train-tokenizer", help="train a small TeleChat2-compatible SentencePiece tokenizer",
        description="BPE, byte fallback, split digits, special tokens at ids 0..8; seconds on the demo data.")
    t.add_argument("--input", nargs="*", default=None, help="jsonl files (default: the shipped demo data)")
    t.add_argument("--out", required=True, help="directory for tokenizer.model + tokenizer_config.json")
    t.add_argument("--vocab-size", type=int, default=3000)
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    t.set_defaults(func=_train_tokenizer)
