"""Scoring through a kv-cache stepper (what the model-parallel build offers: it compiles no full forward) equals the
full-forward scorer, and an emulated mp 2 (every rank's shards cut from the declared predict strategies,
collectives emulated; tests/predict_emulator.py) equals the unsharded scores to 1e-5, prompts past training_seqlen,
one-token (multiple choice) and multi-token continuations."""
from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from telechat_ms.eval.scoring import LoglikelihoodScorer, local_forward, stepper_forward  # noqa: E402
from telechat_ms.infer.kv_cache import CacheStepper  # noqa: E402
from telechat_ms.model.telechat import TeleChatForCausalLM  # noqa: E402
from telechat_ms.parallel.layout import ParallelDims  # noqa: E402
from telechat_ms.parallel.strategies import predict_strategy_table  # noqa: E402
from tests.predict_emulator import ShardedEmulator  # noqa: E402

ROWS, MAX_LEN = 4, 96


def _requests(vocab: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(7)
    out = []
    for n in (45, 12, 60, 33):            # two questions past training_seqlen 32
        ctx = rng.integers(9, vocab, size=n).tolist()
        out += [(ctx, [int(t)]) for t in rng.integers(9, vocab, size=4)]
    out.append((rng.integers(9, vocab, size=40).tolist(), rng.integers(9, vocab, size=3).tolist()))
    out.append((rng.integers(9, vocab, size=5).tolist(), rng.integers(9, vocab, size=2).tolist()))
    return out


def test_stepper_scoring_and_emulated_mp2_equal_the_full_forward(ckpt_factory):
    model = TeleChatForCausalLM.from_pretrained(ckpt_factory("eval_mp", config={"n_head": 8, "num_key_value_heads": 4},
                                                             qk_scale=4.0, seed=13))
    cfg = model.config
    reqs = _requests(cfg.vocab_size)
    full = LoglikelihoodScorer(local_forward(model), MAX_LEN - 1, ROWS).score(reqs)
    local = LoglikelihoodScorer(stepper_forward(CacheStepper(model, ROWS, MAX_LEN, use_jit=False)), MAX_LEN - 1,
                                ROWS).score(reqs)
    weights = {p.name: p.asnumpy().astype(np.float64) for p in model.get_parameters()}
    table = predict_strategy_table(cfg, ParallelDims(mp=2), fused_norm=False)
    emulated = LoglikelihoodScorer(stepper_forward(ShardedEmulator(cfg, weights, table, 2, ROWS, MAX_LEN)),
                                   MAX_LEN - 1, ROWS).score(reqs)
    a, b, c = (np.array([x[0] for x in s]) for s in (full, local, emulated))
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(c, b, atol=1e-5, rtol=0)
    assert [x[1] for x in emulated] == [x[1] for x in local]
    assert np.ptp(a) > 0.1          # the scores differ from one another: the comparison can fail
    # the EvalModel `eval --config` builds on rank 0 of a model-parallel job, over the (here emulated) leader
    from telechat_ms.eval.model import stepper_eval_model
    em = stepper_eval_model(model, None, "mp2", ShardedEmulator(cfg, weights, table, 2, ROWS, MAX_LEN))
    np.testing.assert_allclose([x[0] for x in em.scorer.score(reqs)], a, atol=1e-5, rtol=0)
