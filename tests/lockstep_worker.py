"""msrun worker of tests/test_parallel_lockstep_msrun.py and tests/test_serve_config.py: `telechat-ms generate
--config` (or `serve --config`) of a model-parallel predict YAML, with the one Ascend-only piece,
build_model_parallel (semi-auto context, sliced weights), replaced by a full replica per CPU rank: the predict
configuration's ModelParallelStepper run stand-alone (its strategies are ignored), behind the real lockstep over
msrun's Broadcast. Rank 0 leads (tokenizes, samples, writes the output or serves HTTP), rank 1 follows. Every rank
writes its pid to TRACE_DIR/rank<r>.pid and saves the steps it ran to TRACE_DIR/rank<r>.npz.

    msrun ... tests/lockstep_worker.py TRACE_DIR generate --config ... (the telechat-ms arguments)
"""
from __future__ import annotations

import os
import sys

import numpy as np


class Recorder:
    """The stepper interface, recording every step's inputs and logits."""

    def __init__(self, inner):
        self.inner, self.batch, self.max_len, self.cfg = inner, inner.batch, inner.max_len, inner.cfg
        self.steps = []

    def step(self, *args):
        logits = self.inner.step(*args)
        self.steps.append(([np.asarray(a).copy() for a in args], logits))
        return logits


def main() -> int:
    trace_dir, argv = sys.argv[1], sys.argv[2:]
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

    predict.build_model_parallel = cpu_replica
    rc = cli_main(argv)
    stepper = recorded["stepper"]
    arrays = {}
    for i, (inputs, logits) in enumerate(stepper.steps):
        for j, a in enumerate(inputs):
            arrays[f"s{i}_in{j}"] = a
        arrays[f"s{i}_logits"] = logits
    np.savez(os.path.join(trace_dir, f"rank{recorded['rank']}.npz"), steps=len(stepper.steps),
             clears=stepper.inner.clears, **arrays)
    return rc


if __name__ == "__main__":
    sys.exit(main())
