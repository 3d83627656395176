"""Training step speed: telechat_ms's step (accumulate + reduce/norm + clip/AdamW cells) vs a bare MindSpore
TrainOneStepCell of the same model and optimizer (framework overhead), vs the torch reference with
torch.optim.AdamW on the same batch.

Every measurement runs in a process of its own (MindSpore's runtime threads starve torch in a shared process),
and the three run alternately in pairs of rounds (A B C, then C B A, ...), so each ratio compares runs made next
to each other. Prints steady-state ms/step per run, the median per implementation, and the per-round ratios.

Usage: python benchmarks/train_bench.py [--rounds 3 --layers 4 --hidden 256 --heads 8 --kv 2 --ffn 688
                                         --vocab 1024 --batch 2 --seq 128 --steps 20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

IMPLS = ("telechat_ms", "bare_mindspore", "torch_reference")
SIZES = (("layers", 4), ("hidden", 256), ("heads", 8), ("kv", 2), ("ffn", 688), ("vocab", 1024), ("batch", 2),
         ("seq", 128), ("steps", 20))


def _time(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def _mindspore_step(a, ckpt: str, ids: np.ndarray, bare: bool):
    """A zero-argument step function: telechat_ms's runner, or nn.TrainOneStepCell on the same model."""
    import mindspore as ms
    from mindspore import Tensor, nn

    from telechat_ms.job_config import job_from_dict
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.positions import training_inputs
    from telechat_ms.train.runner import AccumulatingRunner
    from telechat_ms.train.trainer import PositionCache, build_optimizer

    ms.set_context(mode=ms.GRAPH_MODE)
    job = job_from_dict({"model": {"model_config": {}}, "load_checkpoint": ckpt})
    model = TeleChatForCausalLM.from_pretrained(ckpt)
    params = list(model.trainable_params())
    optimizer = build_optimizer(job.optimizer, job.lr_schedule.learning_rate, params)
    if not bare:  # what the trainer runs (AccumulatingRunner, no accumulation, one worker)
        stepper = AccumulatingRunner(model, params, optimizer, 1, job.runner_wrapper)
        positions = PositionCache(model.config)
        micro = [{"input_ids": ids, "labels": ids}]
        return lambda: stepper.run(micro, ids.size, positions, 1.0).loss

    class WithLoss(nn.Cell):
        def __init__(self, net):
            super().__init__(auto_prefix=False)
            self.net = net

        def construct(self, x, y, c, s, m):
            return self.net(x, y, c, s, m)

    cell = nn.TrainOneStepCell(WithLoss(model), optimizer)
    cos, sin, mask = (Tensor(x) for x in training_inputs(model.config, a.seq))
    ids_t = Tensor(ids)
    return lambda: float(cell(ids_t, ids_t, cos, sin, mask).asnumpy())


def _torch_step(ckpt: str, ids: np.ndarray):
    import torch
    from telechat_ms.reference.torch_model import TeleChatRef
    ref = TeleChatRef.from_pretrained(ckpt)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tids = torch.from_numpy(ids.astype(np.int64))

    def step():
        opt.zero_grad()
        loss = ref(tids, labels=tids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        return float(loss)
    return step


def run_one(a) -> None:
    """--impl: time one implementation in this process; print one JSON line."""
    ids = np.random.default_rng(0).integers(0, a.vocab, size=(a.batch, a.seq)).astype(np.int32)
    fn = _torch_step(a.ckpt, ids) if a.impl == "torch_reference" else \
        _mindspore_step(a, a.ckpt, ids, bare=a.impl == "bare_mindspore")
    sec = _time(fn, a.steps)
    print(json.dumps({"impl": a.impl, "ms_per_step": round(sec * 1e3, 2), "tokens_per_s": round(ids.size / sec)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in SIZES:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--rounds", type=int, default=3, help="rounds of the three runs (alternating order)")
    p.add_argument("--impl", choices=IMPLS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.impl:
        run_one(a)
        return

    from telechat_ms.reference.random_checkpoint import write_random_hf_checkpoint
    ckpt = tempfile.mkdtemp()
    write_random_hf_checkpoint(ckpt, dict(hidden_size=a.hidden, n_layer=a.layers, n_head=a.heads,
                                          num_key_value_heads=a.kv, ffn_hidden_size=a.ffn, vocab_size=a.vocab,
                                          training_seqlen=a.seq, base_seqlen=a.seq), seed=0)
    sizes = [f"--{name}={getattr(a, name)}" for name, _ in SIZES]
    runs: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for r in range(a.rounds):
        for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1]):
            out = subprocess.run([sys.executable, __file__, f"--impl={impl}", f"--ckpt={ckpt}", *sizes],
                                 capture_output=True, text=True, check=True).stdout
            record = json.loads(out.strip().splitlines()[-1])
            runs[impl].append(record["ms_per_step"])
            print(json.dumps({"round": r, **record}), flush=True)
    med = {impl: statistics.median(v) for impl, v in runs.items()}
    vs_torch = [o / t for o, t in zip(runs["telechat_ms"], runs["torch_reference"])]
    vs_bare = [o / b for o, b in zip(runs["telechat_ms"], runs["bare_mindspore"])]
    print("median ms/step: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
    print(f"telechat_ms / torch step time per round: {', '.join(f'{x:.2f}x' for x in vs_torch)}; "
          f"telechat_ms / bare TrainOneStepCell: {', '.join(f'{x:.2f}x' for x in vs_bare)} "
          f"({a.layers} layers, hidden {a.hidden}, batch {a.batch} x seq {a.seq}; separate processes)")


if __name__ == "__main__":
    main()
