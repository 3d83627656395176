"""The declared predict strategies describe the unsharded model: a single-process emulation of mp = 2 and 4 ranks
(shards cut from the strategies, collectives emulated) reproduces the real unsharded MindSpore kv-cache path for a
GQA and an MHA model, over a prefill of two left-padded prompts (one longer than training_seqlen) and 24 greedy
decode steps past it (the released incremental NTK rule), logits to 1e-5 and the same tokens."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from telechat_ms.infer.kv_cache import DecodeSession  # noqa: E402
from telechat_ms.model.telechat import TeleChatForCausalLM  # noqa: E402
from telechat_ms.parallel.layout import ParallelDims  # noqa: E402
from telechat_ms.parallel.strategies import predict_strategy_table  # noqa: E402
from tests.predict_emulator import ShardedEmulator  # noqa: E402

T = 32                       # training_seqlen of the checkpoints
PROMPTS = [list(range(40, 80)), list(range(90, 102))]  # 40 tokens (a prompt past T) and 12 (12 + 24 = 36 > T)
STEPS = 24
MAX_LEN = 72           # 40 + 24 slots written; the last slot is the scratch slot (never a token)


@pytest.fixture(scope="module")
def gqa(ckpt_factory):
    """8 query heads / 4 kv heads (2 per kv head), d 8: divisible by mp 2 and 4."""
    return TeleChatForCausalLM.from_pretrained(ckpt_factory("mp_gqa", config={"n_head": 8, "num_key_value_heads": 4},
                                                            qk_scale=4.0, seed=11))


@pytest.fixture(scope="module")
def mha(ckpt_factory):
    return TeleChatForCausalLM.from_pretrained(ckpt_factory("mp_mha", config={"n_head": 8, "num_key_value_heads": 8},
                                                            qk_scale=4.0, seed=12))


def _greedy(session: DecodeSession) -> tuple[list[np.ndarray], list[np.ndarray]]:
    logits = [session.prefill(PROMPTS)]
    tokens = [logits[-1].argmax(-1)]
    for _ in range(STEPS):
        logits.append(session.decode(tokens[-1]))
        tokens.append(logits[-1].argmax(-1))
    return logits, tokens


@pytest.fixture(scope="module")
def reference(gqa, mha):
    """The unsharded MindSpore cached path (CacheStepper, compiled), per model."""
    return {name: _greedy(DecodeSession(model, len(PROMPTS), MAX_LEN)) for name, model in (("gqa", gqa), ("mha", mha))}


def _emulator(model, mp: int, **kw) -> ShardedEmulator:
    cfg = model.config
    weights = {p.name: p.asnumpy().astype(np.float64) for p in model.get_parameters()}
    table = predict_strategy_table(cfg, ParallelDims(mp=mp), fused_norm=False)
    return ShardedEmulator(cfg, weights, table, mp, len(PROMPTS), MAX_LEN, **kw)


@pytest.mark.parametrize("mp", [2, 4])
@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_sharded_prefill_and_decode_equal_the_unsharded_cached_path(name, mp, gqa, mha, reference):
    model = {"gqa": gqa, "mha": mha}[name]
    emulator = _emulator(model, mp)
    k_local = emulator.caches[0][0][0].shape[1]
    assert k_local * mp == model.config.num_key_value_heads            # whole kv heads per rank
    got_logits, got_tokens = _greedy(DecodeSession(SimpleNamespace(config=model.config), len(PROMPTS), MAX_LEN,
                                                   stepper=emulator))
    want_logits, want_tokens = reference[name]
    assert max(len(p) for p in PROMPTS) > T == model.config.training_seqlen and min(map(len, PROMPTS)) + STEPS > T
    for step, (a, b) in enumerate(zip(got_logits, want_logits)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"{name} mp {mp} step {step}")
    assert [t.tolist() for t in got_tokens] == [t.tolist() for t in want_tokens]
    # every step computes something new (positions and the NTK tables move even when a token repeats)
    assert min(np.abs(a - b).max() for a, b in zip(want_logits[1:], want_logits[2:])) > 1e-4


def test_a_key_value_split_by_k_then_v_rows_does_not_reproduce_it(gqa, reference):
    """Negative control (the emulation has teeth): the same mp 2 split of a key_value weight laid out
    [all K; all V] gives different logits from the first step."""
    emulator = _emulator(gqa, 2, kv_rows="grouped")
    got, _ = _greedy(DecodeSession(SimpleNamespace(config=gqa.config), len(PROMPTS), MAX_LEN, stepper=emulator))
    assert np.abs(got[0] - reference["gqa"][0][0]).max() > 1e-3
