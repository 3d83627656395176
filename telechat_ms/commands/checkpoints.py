"""`convert`, `validate-index`, `parity` and `lora merge`: checkpoints in and out of MindSpore."""
from __future__ import annotations

import argparse
import json


def _convert(args: argparse.Namespace) -> int:
    from telechat_ms.weights import convert_checkpoint
    target = "ms" if args.direction == "hf2ms" else "hf"
    index = convert_checkpoint(args.src, args.dst, target=target, dtype=args.dtype,
                               max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                               show_progress=not args.quiet)
    n_files = len(set(index["weight_map"].values()))
    print(f"wrote {len(index['weight_map'])} tensors ({index['metadata']['total_size'] / 1e9:.3f} GB) "
          f"in {n_files} file(s) to {args.dst}")
    return 0


def _validate_index(args: argparse.Namespace) -> int:
    from telechat_ms.config import TeleChatConfig
    from telechat_ms.weights import validate_index
    cfg = TeleChatConfig.from_pretrained(args.config or args.index.rsplit("/", 1)[0])
    report = validate_index(args.index, cfg)
    report.pop("map")
    print(json.dumps(report, indent=2))
    return 0


def _parity(args: argparse.Namespace) -> int:
    from telechat_ms.reference.parity import run_generate_parity, run_parity
    result = run_parity(args.model_dir, seq_len=args.seq_len, batch_size=args.batch_size, device=args.device,
                        seed=args.seed, atol=args.atol)
    if args.generate:
        result["generate"] = run_generate_parity(args.model_dir, new_tokens=args.generate, prompt_len=args.seq_len,
                                                 batch_size=args.batch_size, device=args.device, seed=args.seed,
                                                 atol=args.atol)
        result["ok"] = result["ok"] and result["generate"]["ok"]
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


def _lora_merge(args: argparse.Namespace) -> int:
    from telechat_ms.weights import merge_adapter_dir
    merge_adapter_dir(args.base, args.adapter, args.out, fmt=args.format)
    print(f"merged {args.adapter} into {args.base}: {args.out}")
    return 0


def register(sub: "argparse._SubParsersAction") -> None:
    """Add convert, validate-index, parity and lora."""
    convert = sub.add_parser("convert", help="convert checkpoints between HF and MindSpore")
    convert.add_argument("direction", choices=["hf2ms", "ms2hf"])
    convert.add_argument("src", help="checkpoint directory (HF, MindSpore safetensors, or the port's .ckpt)")
    convert.add_argument("dst", help="output directory (written atomically)")
    convert.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                         help="output dtype (default: keep each tensor's dtype)")
    convert.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(func=_convert)

    validate = sub.add_parser("validate-index", help="check a weight index against a config, without tensor data")
    validate.add_argument("index", help="model.safetensors.index.json")
    validate.add_argument("--config", default=None, help="config.json or its directory (default: the index's)")
    validate.set_defaults(func=_validate_index)

    parity = sub.add_parser("parity", help="compare MindSpore and torch-reference logits on one HF checkpoint")
    parity.add_argument("model_dir")
    parity.add_argument("--seq-len", type=int, default=32)
    parity.add_argument("--batch-size", type=int, default=2)
    parity.add_argument("--device", default="cpu", help="torch device for the reference: cpu or cuda")
    parity.add_argument("--seed", type=int, default=0)
    parity.add_argument("--atol", type=float, default=1e-4, help="max |delta logits| allowed")
    parity.add_argument("--generate", type=int, default=0, metavar="N",
                        help="also compare N greedy tokens generated with each side's kv cache")
    parity.set_defaults(func=_parity)

    lora = sub.add_parser("lora", help="LoRA adapter tools")
    lora_sub = lora.add_subparsers(dest="lora_command", required=True)
    merge = lora_sub.add_parser("merge", help="fold an adapter into its base model (tensor by tensor)")
    merge.add_argument("base", help="base model directory (HF or MindSpore)")
    merge.add_argument("adapter", help="adapter directory written by training")
    merge.add_argument("out", help="output model directory")
    merge.add_argument("--format", choices=["ms", "hf"], default="ms", help="names of the merged checkpoint")
    merge.set_defaults(func=_lora_merge)
