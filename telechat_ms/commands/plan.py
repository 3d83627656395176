"""`plan`: validate a parallel job against its launch and estimate memory before queueing it.

Exit codes: 0 valid and fits; 1 invalid (the launchers refuse to start); 3 valid but estimated not to fit;
2 unreadable config (raised as a TeleChatError and reported by telechat_ms.cli).
"""
from __future__ import annotations

import argparse
import sys

from telechat_ms.commands.train import YAML_KEYS_HELP
from telechat_ms.parallel.memory import HBM_GBS_ATLAS_800T_A2

EXIT_INVALID = 1
EXIT_OVER_MEMORY = 3


def _plan(args: argparse.Namespace) -> int:
    """Run the plan from parsed arguments; prints the report; returns an exit code."""
    from telechat_ms.job_config import load_job_config
    from telechat_ms.parallel.plan import Launch, format_plan, make_plan

    job = load_job_config(args.config, overrides=args.overrides)
    if job.run_mode == "predict":  # the keys generate --config reads, and nothing a predict job ignores
        from telechat_ms.parallel.predict_job import load_predict_job
        load_predict_job(args.config, args.overrides)
    launch = Launch(nodes=args.nodes, npus_per_node=args.npus_per_node, workers=args.workers)
    report = make_plan(job, launch, hbm_gb=args.hbm_gb, runtime_reserve_gb=args.runtime_reserve_gb, mfu=args.mfu,
                       peak_tflops=args.peak_tflops, hbm_bandwidth_gbs=args.hbm_bandwidth_gbs)
    print(format_plan(report))
    if not report.valid:
        print("telechat-ms plan: INVALID plan: fix the errors above before launching", file=sys.stderr)
        return EXIT_INVALID
    return 0 if report.fits else EXIT_OVER_MEMORY


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add plan."""
    p = subparsers.add_parser(
        "plan", allow_abbrev=False, help="validate a parallel job YAML against its launch and estimate per-NPU memory",
        description="Check world size, head/kv-head/ffn/vocab vs model_parallel, layers/offsets vs pipeline_stage, "
                    "sequence vs context_parallel, micro batches and batch; estimate memory per pipeline stage, "
                    "FLOPs and tokens/s. Exit 0 = valid and fits, 1 = invalid, 3 = valid but over memory.",
        epilog=YAML_KEYS_HELP)
    p.add_argument("--config", required=True, help="job YAML (e.g. yaml_configs/115b/finetune_telechat2_115b.yaml)")
    p.add_argument("--nodes", type=int, default=None, help="nodes the launch uses (checked against the YAML)")
    p.add_argument("--npus-per-node", type=int, default=8, help="NPUs per node (Atlas 800T A2: 8)")
    p.add_argument("--workers", type=int, default=None,
                   help="total workers the launch starts (msrun worker_num); overrides --nodes")
    p.add_argument("--hbm-gb", type=float, default=64.0, help="HBM per NPU in GiB (Atlas 800T A2: 64)")
    p.add_argument("--runtime-reserve-gb", type=float, default=2.0,
                   help="HBM kept for CANN runtime / HCCL buffers outside MindSpore's pool, when the YAML sets no "
                        "max_device_memory")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation for the throughput line")
    p.add_argument("--peak-tflops", type=float, default=313.0, help="peak bf16 TFLOPS per NPU (assumed)")
    p.add_argument("--hbm-bandwidth-gbs", type=float, default=HBM_GBS_ATLAS_800T_A2,
                   help="HBM bandwidth per NPU in GB/s for the decode-speed estimate of predict YAMLs (default "
                        f"{HBM_GBS_ATLAS_800T_A2:.1f}: Atlas 800T A2's 64 GB of HBM2e taken as 4 stacks x 1024 bits "
                        "x 3.2 Gb/s per pin, JEDEC HBM2E; derived, Huawei publishes no figure for the 910B)")
    p.set_defaults(func=_plan, overrides=[], takes_overrides=True)
