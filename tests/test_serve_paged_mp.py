"""`serve --config` model parallel on the paged engine: the paged predict strategies (kv heads split whole, the
ScatterUpdate write, the Gather of live blocks) describe the unsharded paged step: a numpy emulation of mp 2 and 4
ranks cut from them replays every call a PagedEngine made (chunked prefill past training_seqlen, decodes, a prefix
hit, batch mates) to 1e-5; the model-parallel paged stepper carries those strategies; the lockstep of paged calls
replays rank 0's calls on a follower; prompt log-probs through the paged step equal the full forward's."""
from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from telechat_ms.infer.paged import PagedStepper  # noqa: E402
from telechat_ms.job_config import ParallelConfig  # noqa: E402
from telechat_ms.model.telechat import TeleChatForCausalLM  # noqa: E402
from telechat_ms.parallel import lockstep  # noqa: E402
from telechat_ms.parallel.layout import ParallelDims  # noqa: E402
from telechat_ms.parallel.paged_predict import ModelParallelPagedStepper  # noqa: E402
from telechat_ms.parallel.parallelize import parallelize_predict  # noqa: E402
from telechat_ms.parallel.strategies import paged_predict_strategy_table, recorded_strategies  # noqa: E402
from telechat_ms.serve.paged_engine import PagedEngine  # noqa: E402
from telechat_ms.serve.sampler import SamplingParams  # noqa: E402
from telechat_ms.serve.sequence import Sequence  # noqa: E402
from tests.paged_emulator import PagedShardedEmulator  # noqa: E402

BLOCKS, BLOCK = 40, 8
LEN = 128


class Recorder:
    """The paged stepper interface, recording every call (inputs, logits)."""

    def __init__(self, inner):
        self.inner, self.cfg, self.num_blocks, self.block_size = inner, inner.cfg, inner.num_blocks, inner.block_size
        self.shapes, self.calls = inner.shapes, []

    def step(self, *args):
        out = self.inner.step(*args)
        self.calls.append(("step", [np.asarray(a).copy() for a in args], out))
        return out

    def step_columns(self, *args):
        out = self.inner.step_columns(*args)
        self.calls.append(("step_columns", [np.asarray(a).copy() for a in args], out))
        return out


class _Tok:
    """What the engine needs of a tokenizer when nobody reads the text (ids only)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def gqa(ckpt_factory):
    """8 query heads / 4 kv heads, training_seqlen 32 (the prompts below pass it: NTK per sequence)."""
    return TeleChatForCausalLM.from_pretrained(ckpt_factory("paged_mp_gqa", config={"n_head": 8,
                                                                                     "num_key_value_heads": 4},
                                                            qk_scale=4.0, seed=21))


def _drive(model, factory, prompts_at: dict[int, list[list[int]]], score: list[int] | None = None):
    engine = PagedEngine(factory, _Tok(), model.config.vocab_size, LEN, num_blocks=BLOCKS, block_size=BLOCK,
                         max_num_batched_tokens=32, max_batch_size=4, max_queue=8, warmup=False)
    engine.prepare()
    seqs = {}
    for it in range(400):
        for p in prompts_at.get(it, []):
            seq = Sequence(list(p), SamplingParams(max_tokens=10, temperature=0.0), lambda d: None)
            seqs[len(seqs)] = seq
            engine.submit([seq])
        if not engine.run_once() and it > max(prompts_at):
            break
    return engine, [seqs[i].output_ids for i in range(len(seqs))]


def _prompts(vocab):
    rng = np.random.default_rng(5)
    shared = rng.integers(9, vocab, 24).tolist()
    return {0: [rng.integers(9, vocab, 70).tolist()],                  # 3 chunks of <= 32, past training_seqlen
            2: [shared + rng.integers(9, vocab, 5).tolist(), rng.integers(9, vocab, 6).tolist()],
            9: [shared + rng.integers(9, vocab, 7).tolist()]}          # same length: the shared blocks are hits


@pytest.fixture(scope="module")
def recorded(gqa):
    """The engine over the model-parallel paged stepper (stand-alone: strategies ignored on CPU), every call
    recorded, and the same engine over the local PagedStepper."""
    model = TeleChatForCausalLM.from_pretrained(gqa.name_or_path)
    applied = parallelize_predict(model, ParallelConfig(model_parallel=2), paged=True)
    rec = {}

    def factory(num_blocks, block_size):
        rec["stepper"] = Recorder(ModelParallelPagedStepper(model, num_blocks, block_size, applied))
        return rec["stepper"]
    prompts = _prompts(gqa.config.vocab_size)
    engine, tokens = _drive(model, factory, prompts)
    _, local_tokens = _drive(gqa, lambda nb, bs: PagedStepper(gqa, nb, bs), prompts)
    return engine, rec["stepper"], tokens, local_tokens, model, applied


def test_the_model_parallel_paged_stepper_carries_whole_kv_head_strategies_and_answers_as_local(recorded):
    engine, stepper, tokens, local_tokens, model, applied = recorded
    assert tokens == local_tokens and all(len(t) == 10 for t in tokens)
    assert engine.metrics.prefix_hits._value.get() >= 16          # the shared 24-token head: two full blocks
    got = recorded_strategies(model)
    for kind in ("k", "v"):
        assert got[f"model.layers.0.attention.paged_write_{kind}"].inputs == ((1, 2, 1), (1,), (1, 2, 1))
        assert got[f"model.layers.1.attention.paged_gather_{kind}"].inputs == ((1, 2, 1), (1, 1))
    assert got["model.layers.0.attention.rotary.mul_cos"].inputs == ((1, 1, 2, 1), (1, 1, 1, 1))
    assert set(stepper.inner.cache_splits.values()) == {(1, 2, 1)}
    assert not any(layer.attention.cache_write_by_add for layer in model.model.layers)
    with pytest.raises(ValueError, match="parallelize_predict"):
        other = TeleChatForCausalLM.from_pretrained(model.name_or_path)
        ModelParallelPagedStepper(other, 4, 8, parallelize_predict(other, ParallelConfig(model_parallel=2)))


@pytest.mark.parametrize("mp", [2, 4])
def test_sharded_emulation_replays_every_engine_call_to_1e5(recorded, gqa, mp):
    _, stepper, *_ = recorded
    cfg = gqa.config
    weights = {p.name: p.asnumpy().astype(np.float64) for p in gqa.get_parameters()}
    table = paged_predict_strategy_table(cfg, ParallelDims(mp=mp), fused_norm=False)
    emu = PagedShardedEmulator(cfg, weights, table, mp, BLOCKS, BLOCK)
    assert emu.caches[0][0][0].shape[1] * mp == cfg.num_key_value_heads     # whole kv heads per rank
    widths = {args[0].shape[1] for _, args, _ in stepper.calls}
    assert {1, 32} <= widths and max(int(a[1].max()) for _, a, _ in stepper.calls) > cfg.training_seqlen
    for i, (kind, args, want) in enumerate(stepper.calls):
        got = getattr(emu, kind)(*args)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"call {i} {kind} mp {mp}")
    # negative control: the cache matters (a replay that skips the first prompt's first chunk does not reproduce)
    emu = PagedShardedEmulator(cfg, weights, table, mp, BLOCKS, BLOCK)
    worst = max(np.abs(getattr(emu, kind)(*args) - want).max() for kind, args, want in stepper.calls[1:4])
    assert worst > 1e-3


def test_paged_lockstep_replays_rank0_calls_and_scores_through_the_paged_step(gqa):
    from telechat_ms.serve.paged_score import PagedScorer
    from telechat_ms.serve.server import full_forward_scorer
    from tests.test_parallel_predict import RecordingChannel
    channel = RecordingChannel()
    leader_rec = Recorder(PagedStepper(gqa, BLOCKS, BLOCK))
    ids = np.random.default_rng(9).integers(9, gqa.config.vocab_size, 45).tolist()

    def work(leader):
        engine, tokens = _drive(gqa, lambda nb, bs: leader, _prompts(gqa.config.vocab_size))
        return tokens, PagedScorer(engine)(ids), engine

    tokens, scored, engine = lockstep.lead_or_follow(0, leader_rec, channel, work,
                                                     leader_cls=lockstep.PagedLeaderStepper)
    assert all(r == 0 for r in engine.blocks.ref)             # the scoring blocks went back
    np.testing.assert_allclose(scored, full_forward_scorer(gqa)(ids), atol=1e-5, rtol=0)
    follower = TeleChatForCausalLM.from_pretrained(gqa.name_or_path)
    seen = []
    assert lockstep.lead_or_follow(1, PagedStepper(follower, BLOCKS, BLOCK), channel, work,
                                   on_step=lambda inputs, logits: seen.append((inputs, logits))) is None
    assert channel.messages == [] and len(seen) == len(leader_rec.calls) > 10
    assert sum(kind == "step_columns" for kind, _, _ in leader_rec.calls) == 2     # 45 tokens: chunks of 32, 13
    for (inputs, logits), (_, sent, want) in zip(seen, leader_rec.calls):
        for a, b in zip(inputs, sent):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(logits, want)


@pytest.mark.parametrize("name", ["115b_heads_ascend"])
def test_every_primitive_of_the_paged_step_carries_a_fitting_strategy(name):
    """Traced op by op (PyNative): every primitive a paged prefill chunk, a batched decode and a scoring call run
    has a strategy that cuts its inputs (Reshape / Cast exempt), and every declared strategy is used."""
    from telechat_ms.config import TeleChatConfig
    from telechat_ms.parallel.strategies import resolve
    from tests.predict_trace import strategy_problems, trace
    from tests.test_parallel_predict_strategies import CASES
    ms.set_context(mode=ms.PYNATIVE_MODE)
    fields, mp = CASES[name]
    cfg = TeleChatConfig(n_layer=2, ffn_hidden_size=32 * mp, vocab_size=128 * mp, training_seqlen=16, base_seqlen=16,
                         seq_length=64, **fields)
    model = TeleChatForCausalLM(cfg)
    applied = parallelize_predict(model, ParallelConfig(model_parallel=mp), paged=True)
    stepper = ModelParallelPagedStepper(model, 12, 8, applied, use_jit=False)
    tables = np.array([[1, 2, 0, 0], [3, 0, 0, 0]], np.int32)
    calls = {}
    with trace() as calls["prefill"]:
        stepper.step(np.full((1, 16), 9), np.arange(16)[None], np.full((1, 16), 20), np.arange(8, 24)[None],
                     tables[:1], 15)
    with trace() as calls["decode"]:
        stepper.step(np.array([[4], [5]]), np.array([[16], [3]]), np.array([[17], [4]]), np.array([[24], [27]]),
                     np.array([[1, 2, 4, 0], [3, 0, 0, 0]], np.int32), 0)
    with trace() as calls["score"]:
        stepper.step_columns(np.full((1, 8), 7), np.arange(8)[None], np.full((1, 8), 8), np.arange(40, 48)[None],
                             np.array([[5, 0, 0, 0]], np.int32))
    for graph, traced in calls.items():
        assert traced and strategy_problems(traced) == [], graph
    kinds = {c.kind for traced in calls.values() for c in traced}
    assert {"ScatterUpdate", "Gather", "BatchMatMul"} <= kinds and not {"ScatterNdAdd", "FlashAttentionScore"} & kinds
    used = {id(c.prim) for traced in calls.values() for c in traced}
    assert [p for p in applied.table if id(resolve(model, p)) not in used] == []
    assert set(stepper.cache_splits.values()) == {(1, mp, 1)}


def test_ascend_paged_kernels_wiring_computes_the_gather_path(recorded, gqa):
    """The Ascend path (PagedStepper(kernels=True): block-major caches, ReshapeAndCache writes, PagedAttention for
    decode calls) with the two kernels computed in numpy as documented (they have no CPU implementation: this is
    the wiring, never a run of the kernels) replays every call of the engine run to 1e-5 of the gather path, and
    under mp 2 every primitive it runs carries a fitting strategy (MindFormers' PagedAttentionMgr strategies)."""
    from telechat_ms.infer.paged import kernels_for_device
    from tests.predict_trace import strategy_problems, trace
    _, stepper, *_ = recorded
    assert not kernels_for_device()                       # CPU: the gather path is the default
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = TeleChatForCausalLM.from_pretrained(gqa.name_or_path)
    applied = parallelize_predict(model, ParallelConfig(model_parallel=2), paged=True, kernels=True)
    kern = ModelParallelPagedStepper(model, BLOCKS, BLOCK, applied, use_jit=False, kernels=True)
    assert tuple(kern.cache.k[0].shape) == (BLOCKS, BLOCK, gqa.config.num_key_value_heads, gqa.config.head_dim)
    attn = model.model.layers[0].attention
    assert (attn.paged_attention.head_num, attn.paged_attention.kv_head_num) == (8, 4)
    assert attn.paged_attention.scale_value == pytest.approx(gqa.config.head_dim ** -0.5)
    assert set(kern.cache_splits.values()) == {(1, 1, 2, 1)}
    with trace() as calls:
        for i, (kind, args, want) in enumerate(stepper.calls):
            got = getattr(kern, kind)(*args)
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"call {i} {kind}")
    assert strategy_problems(calls) == []
    kinds = {c.kind for c in calls}
    assert {"ReshapeAndCache", "PagedAttention", "Gather"} <= kinds and "ScatterUpdate" not in kinds
    with pytest.raises(ValueError, match="kernels=True"):
        ModelParallelPagedStepper(gqa, 4, 8, recorded[5], kernels=True)
