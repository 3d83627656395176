"""msrun worker of tests/test_parallel_lockstep_msrun.py and tests/test_serve_config.py: `telechat-ms generate
--config` (or `serve --config`) of a model-parallel predict YAML, with the one Ascend-only piece,
build_model_parallel / build_model_parallel_paged (semi-auto context, sliced weights), replaced by a full replica per
CPU rank: the predict configuration's ModelParallelStepper (generate) or ModelParallelPagedStepper (serve) run
stand-alone (their strategies are ignored), behind the real lockstep over
msrun's Broadcast. Rank 0 leads (tokenizes, samples, writes the output or serves HTTP), rank 1 follows. Every rank
writes its pid to TRACE_DIR/rank<r>.pid and saves the steps it ran to TRACE_DIR/rank<r>.npz.

    msrun ... tests/lockstep_worker.py TRACE_DIR generate --config ... (the telechat-ms arguments)
"""
from __future__ import annotations

import os
import sys

import numpy as np


class Recorder:
    """The stepper interface (static or paged), recording every step's inputs and logits."""

    def __init__(self, inner):
        self.inner, self.cfg = inner, inner.cfg
        for name in ("batch", "max_len", "num_blocks", "block_size", "shapes", "check"):
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))
        self.steps = []

    def step(self, *args):
        logits = self.inner.step(*args)
        self.steps.append(([np.asarray(a).copy() for a in args], logits))
        return logits

    def step_columns(self, *args):
        logits = self.inner.step_columns(*args)
        self.steps.append(([np.asarray(a).copy() for a in args] + [np.array(-1)], logits))
        return logits


def main() -> int:
    trace_dir, argv = sys.argv[1], sys.argv[2:]
    import telechat_ms.parallel.paged_predict as paged_predict
    import telechat_ms.parallel.predict as predict
    from telechat_ms.cli import main as cli_main
    recorded = {}

    def cpu_replica(job, use_jit=True):
        from mindspore.communication import get_group_size, get_rank, init
        from telechat_ms.model.telechat import TeleChatForCausalLM
        from telechat_ms.parallel.parallelize import parallelize_predict
        init()
        with open(os.path.join(trace_dir, f"rank{get_rank()}.pid"), "w") as fh:   # a serve test SIGTERMs rank 0
            fh.write(str(os.getpid()))
        model = TeleChatForCausalLM.from_pretrained(job.load_checkpoint, config=job.model_config)
        applied = parallelize_predict(model, job.parallel_config, job.source)
        stepper = Recorder(predict.ModelParallelStepper(model, job.batch_size, job.model_config.seq_length, applied,
                                                        use_jit))
        recorded["stepper"], recorded["rank"] = stepper, get_rank()
        return predict.ModelParallelSession(model, stepper, get_rank(), get_group_size())

    def cpu_paged_replica(job, num_blocks, block_size, use_jit=True):
        from mindspore.communication import get_group_size, get_rank, init
        from telechat_ms.model.telechat import TeleChatForCausalLM
        from telechat_ms.parallel.paged_predict import ModelParallelPagedStepper
        from telechat_ms.parallel.parallelize import parallelize_predict
        init()
        with open(os.path.join(trace_dir, f"rank{get_rank()}.pid"), "w") as fh:
            fh.write(str(os.getpid()))
        model = TeleChatForCausalLM.from_pretrained(job.load_checkpoint, config=job.model_config)
        applied = parallelize_predict(model, job.parallel_config, job.source, paged=True)
        stepper = Recorder(ModelParallelPagedStepper(model, num_blocks, block_size, applied, use_jit))
        recorded["stepper"], recorded["rank"] = stepper, get_rank()
        return predict.ModelParallelSession(model, stepper, get_rank(), get_group_size())

    predict.build_model_parallel = cpu_replica
    paged_predict.build_model_parallel_paged = cpu_paged_replica
    rc = cli_main(argv)
    stepper = recorded["stepper"]
    arrays = {}
    for i, (inputs, logits) in enumerate(stepper.steps):
        for j, a in enumerate(inputs):
            arrays[f"s{i}_in{j}"] = a
        arrays[f"s{i}_logits"] = logits
    np.savez(os.path.join(trace_dir, f"rank{recorded['rank']}.npz"), steps=len(stepper.steps),
             clears=getattr(stepper.inner, "clears", 0), **arrays)
    return rc


if __name__ == "__main__":
    sys.exit(main())
