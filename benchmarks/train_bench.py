"""Training step speed at two sizes: telechat_ms's full step vs bare MindSpore steps of the same model, the torch
reference with torch.optim.AdamW, and MindFormers' LlamaForCausalLM at the same shapes.

Contenders (what each does per step):
  telechat_ms       the trainer's AccumulatingRunner: one graph (forward, backward, token-mean scaling, global
                    norm + clipping at 1.0, torch-exact fused AdamW); loss and norm read one step late
  bare_adamw_wd     nn.TrainOneStepCell(our model) + nn.AdamWeightDecay (the fused kernel, no bias correction,
                    no clipping): the floor of a MindSpore step on this model
  bare_fused_adamw  nn.TrainOneStepCell(our model) + telechat_ms's FusedAdamW (the same kernel, torch-exact), no clip
  torch_reference   torch eager reference model + clip_grad_norm_(1.0) + torch.optim.AdamW
  mindformers_llama MindFormers' LlamaForCausalLM (use_rope_slice, fused_rms_norm off, fp32) in
                    nn.TrainOneStepCell + nn.AdamWeightDecay
Every measurement runs in a process of its own (MindSpore's runtime threads starve torch in a shared process);
the contenders run alternately (forward order, then reversed, ...), so each ratio compares neighbouring runs.
Prints ms/step per run, medians and the ratios per round. The box is shared: read medians, not single runs.

Usage: python benchmarks/train_bench.py [--sizes small,large] [--rounds 3] [--steps 8] [--impls a,b,...]
                                        [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

IMPLS = ("telechat_ms", "bare_adamw_wd", "bare_fused_adamw", "torch_reference", "mindformers_llama")
BARE = ("bare_adamw_wd", "bare_fused_adamw")
SIZES = {  # layers, hidden, heads, kv heads, ffn, vocab, seq (batch 2, fp32)
    "small": dict(layers=4, hidden=256, heads=8, kv=2, ffn=688, vocab=1024, seq=128),
    "large": dict(layers=4, hidden=1024, heads=16, kv=4, ffn=2752, vocab=4096, seq=256),
}
LR, BETAS, EPS, WD = 1e-4, (0.9, 0.95), 1e-8, 0.1


def _time(fn, steps: int, warmup: int = 3) -> tuple[float, float]:
    """(wall, CPU) seconds per step; CPU time (all threads of the process) is the steadier one on a shared box."""
    for _ in range(warmup):
        fn()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    if hasattr(fn, "flush"):  # telechat_ms: the last step's loss read back, inside the timed span
        fn.flush()
    return (time.perf_counter() - t) / steps, (time.process_time() - c) / steps


class _Stepper:
    """telechat_ms's step as the trainer drives it: launch, then read the previous step's loss and norm."""

    def __init__(self, runner, micro, tokens, positions):
        self.runner, self.micro, self.tokens, self.positions, self.pending = runner, micro, tokens, positions, None

    def __call__(self):
        launched = self.runner.run(self.micro, self.tokens, self.positions, LR)
        if self.pending is not None:
            self.pending.outcome()
        self.pending = launched

    def flush(self):
        if self.pending is not None:
            self.pending.outcome()
            self.pending = None


def _mindspore_step(impl: str, ckpt: str, ids: np.ndarray, seq: int):
    import mindspore as ms
    from mindspore import Tensor, nn

    from telechat_ms.job_config import job_from_dict
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.positions import training_inputs
    from telechat_ms.train.runner import AccumulatingRunner
    from telechat_ms.train.trainer import PositionCache, build_optimizer

    ms.set_context(mode=ms.GRAPH_MODE)
    job = job_from_dict({"model": {"model_config": {}}, "load_checkpoint": ckpt,
                         "optimizer": {"betas": list(BETAS), "eps": EPS, "weight_decay": WD},
                         "runner_wrapper": {"use_clip_grad": True, "max_grad_norm": 1.0}})
    model = TeleChatForCausalLM.from_pretrained(ckpt)
    model.set_train(True)  # as the trainer does (every MindSpore contender runs the same training-mode graph)
    params = list(model.trainable_params())
    if impl == "telechat_ms":  # what the trainer runs (no accumulation, one worker)
        optimizer = build_optimizer(job.optimizer, LR, params)
        runner = AccumulatingRunner(model, params, optimizer, 1, job.runner_wrapper)
        micro = [{"input_ids": ids, "labels": ids}]
        return _Stepper(runner, micro, int((ids[:, 1:] != -100).sum()), PositionCache(model.config))
    if impl == "bare_adamw_wd":
        optimizer = nn.AdamWeightDecay(params, LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD)
    else:
        optimizer = build_optimizer(job.optimizer, LR, params)

    class WithLoss(nn.Cell):
        def __init__(self, net):
            super().__init__(auto_prefix=False)
            self.net = net

        def construct(self, x, y, c, s, m):
            return self.net(x, y, c, s, m)

    cell = nn.TrainOneStepCell(WithLoss(model), optimizer)
    cos, sin, mask = (Tensor(x) for x in training_inputs(model.config, seq))
    ids_t = Tensor(ids)
    return lambda: float(cell(ids_t, ids_t, cos, sin, mask).asnumpy())


def _llama_step(a, ids: np.ndarray):
    import mindspore as ms
    from mindspore import Tensor, nn
    from telechat_ms import backend  # noqa: F401  (MindFormers imported quietly)
    from mindformers.models.llama import LlamaConfig, LlamaForCausalLM

    ms.set_context(mode=ms.GRAPH_MODE)
    cfg = LlamaConfig(batch_size=a.batch, seq_length=a.seq, hidden_size=a.hidden, num_layers=a.layers,
                      num_heads=a.heads, n_kv_heads=a.kv, intermediate_size=a.ffn, vocab_size=a.vocab,
                      compute_dtype="float32", param_init_type="float32", layernorm_compute_type="float32",
                      softmax_compute_type="float32", rotary_dtype="float32", use_rope_slice=True,
                      fused_rms_norm=False, use_flash_attention=False, use_past=False)
    model = LlamaForCausalLM(cfg)
    model.set_train(True)
    optimizer = nn.AdamWeightDecay(model.trainable_params(), LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                   weight_decay=WD)
    cell = nn.TrainOneStepCell(model, optimizer)
    # LlamaForCausalLM trains on seq + 1 tokens (it slices inputs and shifted labels itself)
    ids_t = Tensor(np.concatenate([ids, ids[:, :1]], axis=1))
    return lambda: float(cell(ids_t).asnumpy())


def _torch_step(ckpt: str, ids: np.ndarray):
    import torch
    from telechat_ms.reference.torch_model import TeleChatRef
    ref = TeleChatRef.from_pretrained(ckpt)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    tids = torch.from_numpy(ids.astype(np.int64))

    def step():
        opt.zero_grad()
        loss = ref(tids, labels=tids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        return float(loss)
    return step


def _set_threads(n: int) -> None:
    """--threads N (0: the libraries' defaults): the intra-op threads of MindSpore's CPU kernels and of torch."""
    if n <= 0:
        return
    import torch
    torch.set_num_threads(n)
    import mindspore as ms
    ms.device_context.cpu.op_tuning.threads_num(n)


def run_one(a) -> None:
    """--impl: time one contender in this process; print one JSON line."""
    _set_threads(a.threads)
    ids = np.random.default_rng(0).integers(0, a.vocab, size=(a.batch, a.seq)).astype(np.int32)
    if a.impl == "torch_reference":
        fn = _torch_step(a.ckpt, ids)
    elif a.impl == "mindformers_llama":
        fn = _llama_step(a, ids)
    else:
        fn = _mindspore_step(a.impl, a.ckpt, ids, a.seq)
    if a.profile:
        _profile(fn, a.profile)
        return
    sec, cpu = _time(fn, a.steps)
    print(json.dumps({"impl": a.impl, "ms_per_step": round(sec * 1e3, 2), "cpu_ms_per_step": round(cpu * 1e3, 2),
                      "tokens_per_s": round(ids.size / sec)}))


def _profile(fn, out_dir: str) -> None:
    """--profile DIR: MindSpore's profiler around 3 steps after warm-up (the README summarises its op table)."""
    import mindspore as ms
    for _ in range(3):
        fn()
    prof = ms.Profiler(output_path=out_dir, profile_memory=False)
    for _ in range(3):
        fn()
    if hasattr(fn, "flush"):
        fn.flush()
    prof.stop()
    prof.analyse()
    print(json.dumps({"profile": out_dir, "share": summarize_profile(out_dir)}))


def _op_kind(op_type: str, scope: str) -> str:
    if "optimizer" in scope:
        return "optimizer"
    if "Finish" in scope:
        return "norm + clip"
    if op_type == "MatMul":
        return "matmuls"
    if op_type in ("BatchMatMul", "Softmax", "SoftmaxGrad"):
        return "attention core"
    if op_type in ("LogSoftmax", "LogSoftmaxGrad", "GatherD", "GatherDGradV2"):
        return "loss"
    if op_type in ("Transpose", "Concat", "Tile", "Split", "Slice", "StridedSlice", "Cast", "Reshape", "Stack",
                   "BroadcastTo", "TensorCopySlices"):
        return "copies"
    return "element-wise + reductions"


def summarize_profile(out_dir: str) -> dict[str, float]:
    """Share of kernel time per kind of work, from the profiler's cpu_op_detail_info CSV (all profiled steps)."""
    import csv
    import glob
    shares: dict[str, float] = {}
    for path in glob.glob(os.path.join(out_dir, "*", "FRAMEWORK", "cpu_op_detail_info_*.csv")):
        with open(path, encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                kind = _op_kind(row["op_type"], row["full_op_name"])
                shares[kind] = shares.get(kind, 0.0) + float(row["op_total_time(ms)"])
    total = sum(shares.values()) or 1.0
    return {k: round(100 * v / total, 1) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}


def _bench_size(name: str, dims: dict, a, impls: list[str]) -> dict:
    from telechat_ms.reference.random_checkpoint import write_random_hf_checkpoint
    ckpt = tempfile.mkdtemp(prefix=f"train_bench_{name}_")
    write_random_hf_checkpoint(ckpt, dict(hidden_size=dims["hidden"], n_layer=dims["layers"], n_head=dims["heads"],
                                          num_key_value_heads=dims["kv"], ffn_hidden_size=dims["ffn"],
                                          vocab_size=dims["vocab"], training_seqlen=dims["seq"],
                                          base_seqlen=dims["seq"]), seed=0)
    flags = [f"--{k}={v}" for k, v in dims.items()] + [f"--batch={a.batch}", f"--steps={a.steps}",
                                                       f"--threads={a.threads}"]
    runs: dict[str, list[float]] = {impl: [] for impl in impls}
    cpu: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(a.rounds):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            proc = subprocess.run([sys.executable, __file__, f"--impl={impl}", f"--ckpt={ckpt}", *flags],
                                  capture_output=True, text=True, env={**os.environ, "GLOG_v": "3"})
            if proc.returncode != 0:
                raise SystemExit(f"{impl} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            record = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[impl].append(record["ms_per_step"])
            cpu[impl].append(record["cpu_ms_per_step"])
            print(json.dumps({"size": name, "round": r, **record}), flush=True)
    print(f"[{name}: {dims['layers']} layers, hidden {dims['hidden']}, heads {dims['heads']}/{dims['kv']}, ffn "
          f"{dims['ffn']}, vocab {dims['vocab']}, batch {a.batch} x seq {dims['seq']}, fp32]")
    out = {}
    for label, table in (("wall", runs), ("cpu", cpu)):
        med = {impl: statistics.median(v) for impl, v in table.items()}
        print(f"  median {label} ms/step: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
        out[label] = {"median_ms": med, "ratios": _ratios(table, a.rounds, label)}
    return out


def _ratios(runs: dict[str, list[float]], rounds: int, label: str) -> dict[str, float]:
    """telechat_ms over each other contender, per round (neighbouring runs) and their median."""
    ratios: dict[str, float] = {}
    if "telechat_ms" not in runs:
        return ratios
    ours = runs["telechat_ms"]
    for key, name in (("torch_reference", "torch eager + AdamW"), ("mindformers_llama", "MindFormers Llama")):
        if key in runs:
            per = [o / t for o, t in zip(ours, runs[key])]
            ratios[key] = statistics.median(per)
            print(f"  {label}: telechat_ms / {name}: median {ratios[key]:.2f}x (rounds "
                  + ", ".join(f"{x:.2f}" for x in per) + ")")
    bare = [k for k in BARE if k in runs]
    if bare:
        fastest = [min(runs[k][i] for k in bare) for i in range(rounds)]
        per = [o / b for o, b in zip(ours, fastest)]
        ratios["fastest_bare"] = statistics.median(per)
        print(f"  {label}: telechat_ms / fastest bare MindSpore step ({' or '.join(bare)}): median "
              f"{ratios['fastest_bare']:.2f}x (rounds " + ", ".join(f"{x:.2f}" for x in per) + ")")
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="small,large", help="comma-separated: " + ", ".join(SIZES))
    p.add_argument("--rounds", type=int, default=3, help="rounds of all contenders (alternating order)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run (after 3 warm-up steps)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads for every contender (0: defaults)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ", ".join(IMPLS))
    p.add_argument("--impl", choices=IMPLS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile", default=None, help="with --impl and --ckpt: profile that contender into DIR")
    for key in SIZES["small"]:
        p.add_argument(f"--{key}", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.impl:
        run_one(a)
        return
    impls = [i for i in a.impls.split(",") if i]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        p.error(f"unknown contender(s) {unknown}; choose from {', '.join(IMPLS)}")
    summary = {name: _bench_size(name, SIZES[name], a, impls) for name in a.sizes.split(",")}
    print("SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
