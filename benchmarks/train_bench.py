"""Training step speed, one run: telechat_ms's step (accumulate + reduce/norm + clip/AdamW cells) vs a bare
MindSpore TrainOneStepCell of the same model and optimizer (framework overhead), vs the torch reference with
torch.optim.AdamW on the same batch. Prints steady-state ms/step, tokens/s and the ratios.

Usage: python benchmarks/train_bench.py [--layers 4 --hidden 256 --heads 8 --kv 2 --ffn 688 --vocab 1024
                                         --batch 2 --seq 128 --steps 20]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np


def _time(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("layers", 4), ("hidden", 256), ("heads", 8), ("kv", 2), ("ffn", 688), ("vocab", 1024),
                          ("batch", 2), ("seq", 128), ("steps", 20)):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()

    import mindspore as ms
    import torch
    from mindspore import Tensor, nn

    from telechat_ms.job_config import job_from_dict
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.reference.random_checkpoint import write_random_hf_checkpoint
    from telechat_ms.reference.torch_model import TeleChatRef
    from telechat_ms.train.runner import AccumulatingRunner
    from telechat_ms.train.trainer import PositionCache, build_optimizer

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    cfg = dict(hidden_size=a.hidden, n_layer=a.layers, n_head=a.heads, num_key_value_heads=a.kv,
               ffn_hidden_size=a.ffn, vocab_size=a.vocab, training_seqlen=a.seq, base_seqlen=a.seq)
    tmp = tempfile.mkdtemp()
    write_random_hf_checkpoint(tmp, cfg, seed=0)
    job = job_from_dict({"model": {"model_config": {}}, "load_checkpoint": tmp})
    rng = np.random.default_rng(0)
    ids = rng.integers(0, a.vocab, size=(a.batch, a.seq)).astype(np.int32)
    tokens = a.batch * a.seq
    results = {}

    # telechat_ms step: what the trainer runs (AccumulatingRunner, no accumulation, one worker)
    model = TeleChatForCausalLM.from_pretrained(tmp)
    params = list(model.trainable_params())
    stepper = AccumulatingRunner(model, params, build_optimizer(job, params), 1, job)
    positions = PositionCache(model)
    micro = [{"input_ids": ids, "labels": ids}]
    cos, sin, mask = model.position_inputs(a.seq)
    ids_t = Tensor(ids)

    def ours():
        return stepper.run(micro, tokens, positions, 1.0).loss

    results["telechat_ms"] = _time(ours, a.steps)

    # bare TrainOneStepCell, same model and optimizer
    model2 = TeleChatForCausalLM.from_pretrained(tmp)

    class WithLoss(nn.Cell):
        def __init__(self, net):
            super().__init__(auto_prefix=False)
            self.net = net

        def construct(self, x, y, c, s, m):
            return self.net(x, y, c, s, m)

    bare = nn.TrainOneStepCell(WithLoss(model2), build_optimizer(job, list(model2.trainable_params())))
    results["bare_mindspore"] = _time(lambda: float(bare(ids_t, ids_t, cos, sin, mask).asnumpy()), a.steps)

    # torch reference + AdamW
    torch.set_num_threads(torch.get_num_threads())
    ref = TeleChatRef.from_pretrained(tmp)
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tids = torch.from_numpy(ids.astype(np.int64))

    def torch_step():
        topt.zero_grad()
        loss = ref(tids, labels=tids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        topt.step()
        return float(loss)

    results["torch_reference"] = _time(torch_step, a.steps)
    for name, sec in results.items():
        print(json.dumps({"impl": name, "ms_per_step": round(sec * 1e3, 2), "tokens_per_s": round(tokens / sec)}))
    print(f"telechat_ms / torch step time: {results['telechat_ms'] / results['torch_reference']:.2f}x; "
          f"telechat_ms / bare TrainOneStepCell: {results['telechat_ms'] / results['bare_mindspore']:.2f}x "
          f"({a.layers} layers, hidden {a.hidden}, batch {a.batch} x seq {a.seq})")


if __name__ == "__main__":
    main()
