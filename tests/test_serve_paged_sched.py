"""The paged engine's latency policy: prompt chunks sized by the measured cost of the calls so decoding streams are
slowed at most --max-decode-slowdown times, and decode rows of very different contexts split into two calls; greedy
tokens stay those of one-sequence generate whatever the chunking."""
from __future__ import annotations

import pytest

pytest.importorskip("mindspore")
pytest.importorskip("fastapi")

from telechat_ms.errors import ConfigError  # noqa: E402
from telechat_ms.serve.paged_engine import MIN_PREFILL, CallTimings, PagedEngine  # noqa: E402
from telechat_ms.serve.sampler import SamplingParams  # noqa: E402
from telechat_ms.serve.sequence import Sequence  # noqa: E402
from telechat_ms.serve.server import full_forward_scorer, paged_stepper_factory  # noqa: E402
from tests import serve_fixtures as fx  # noqa: E402
from tests.serve_fixtures import random_ids  # noqa: E402

serve_model_dir, tokenizer, ref_model = fx.serve_model_dir, fx.tokenizer, fx.ref_model   # module fixtures


def _engine(model, tokenizer, max_len=256, budget=128, block=8, num_blocks=200, **kw) -> PagedEngine:
    eng = PagedEngine(paged_stepper_factory(model), tokenizer, tokenizer.vocab_size, max_len, num_blocks=num_blocks,
                      block_size=block, max_num_batched_tokens=budget, max_batch_size=4, max_queue=16,
                      scorer=full_forward_scorer(model), warmup=False, **kw)
    eng.prepare()
    return eng


def _seq(ids, n) -> Sequence:
    return Sequence(list(ids), SamplingParams(temperature=0.0, max_tokens=n), lambda d: None)


def _generate(model, prompt, n):
    return model.generate([prompt], max_new_tokens=n, eos_token_id=None).new_tokens[0]


class FixedTimings(CallTimings):
    """Decodes take 1 s; a prompt chunk of width w takes w / 64 s at any context (so 64 tokens fit beside a decode
    at a slowdown of 2)."""

    def __init__(self):
        super().__init__()
        self.asked = []

    def record(self, shape, seconds):
        pass

    def decode_time(self):
        return 1.0

    def estimate(self, shape, half=None):
        self.asked.append(shape)
        return shape[1] / 64


def _chunk_log(engine) -> list[tuple[int, bool]]:
    """Wrap engine._call: records (width of each prompt-chunk call, whether a decode call ran in the same step)."""
    log, original = [], engine._call
    state = {"decoded": False}

    def call(rows, n_rows, width, ctx):
        if width == 1:
            state["decoded"] = True
        else:
            log.append((max(k for _, k in rows), state["decoded"]))
        return original(rows, n_rows, width, ctx)
    engine._call = call
    original_run = engine._run

    def run(decode, chunks):
        state["decoded"] = False
        return original_run(decode, chunks)
    engine._run = run
    return log


def _drive(engine, schedule: dict[int, list[Sequence]]) -> None:
    last = max(schedule)
    for it in range(3000):
        for seq in schedule.get(it, []):
            engine.submit([seq])
        if not engine.run_once() and it >= last:
            return
    raise AssertionError("engine did not finish")


def test_call_timings_skip_the_compiling_call_and_extrapolate_by_doubling():
    t = CallTimings(alpha=0.5)
    t.record((1, 64, 32), 9.0)                    # the first call of a shape compiles: not a measurement
    assert t.estimate((1, 64, 32)) is None
    t.record((1, 64, 32), 2.0)
    t.record((1, 64, 32), 4.0)
    assert t.estimate((1, 64, 32)) == pytest.approx(3.0)
    assert t.estimate((1, 128, 32), (1, 64, 32)) == pytest.approx(6.0)
    assert t.estimate((1, 256, 32), (1, 128, 32)) is None      # only one doubling past a measured width
    assert t.decode_time() is None
    t.record((4, 1, 32), 5.0)
    t.record((4, 1, 32), 1.0)
    t.record((2, 1, 64), 7.0)                     # compiles
    assert t.decode_time() == pytest.approx(1.0)
    t.record((2, 1, 64), 3.0)
    assert t.decode_time() == pytest.approx(2.0)               # one running average over every decode shape


def test_prompt_chunks_beside_decodes_fit_the_slowdown_and_tokens_equal_generate(ref_model, tokenizer):
    vocab = tokenizer.vocab_size
    engine = _engine(ref_model, tokenizer)
    engine.timings = FixedTimings()
    log = _chunk_log(engine)
    short, long_prompt = random_ids(6, 1, vocab), random_ids(230, 2, vocab)
    a, b = _seq(short, 14), _seq(long_prompt, 6)
    _drive(engine, {0: [a], 3: [b]})
    assert a.output_ids == _generate(ref_model, short, 14)
    assert b.output_ids == _generate(ref_model, long_prompt, 6)
    beside = [w for w, decoded in log if decoded]
    alone = [w for w, decoded in log if not decoded]
    # beside a decode (1 s) a chunk may add (2 - 1) x 1 s: 64 tokens (64 / 64 s), never the 128-token budget
    assert beside == [64, 64, 64, 38] and alone == [6]
    assert all(r == 0 for r in engine.blocks.ref)


def test_slowdown_zero_keeps_the_full_budget_beside_decodes(ref_model, tokenizer):
    vocab = tokenizer.vocab_size
    engine = _engine(ref_model, tokenizer, max_decode_slowdown=0)
    engine.timings = FixedTimings()
    log = _chunk_log(engine)
    a, b = _seq(random_ids(6, 1, vocab), 14), _seq(random_ids(230, 2, vocab), 6)
    _drive(engine, {0: [a], 3: [b]})
    assert [w for w, decoded in log if decoded][0] == 127      # the budget less the one decode token
    assert engine.timings.asked == []                         # no cost is consulted


def test_unmeasured_widths_start_at_the_smallest_chunk(ref_model, tokenizer):
    engine = _engine(ref_model, tokenizer)
    engine._allowance = 10.0                                  # nothing measured: only MIN_PREFILL is known to fit
    assert engine._chunk(0, 100) == MIN_PREFILL
    engine.timings.by_shape[(1, 32, 32)] = 0.5                # a 32-chunk measured: 64 estimated at 1.0
    engine._allowance = 1.2
    assert engine._chunk(0, 100) == 64 and engine._allowance == pytest.approx(0.2)
    engine._allowance = None                                  # nothing decoding: the chunk area alone decides
    assert engine._chunk(0, 100) == 100


def test_a_slowdown_below_one_is_refused(ref_model, tokenizer):
    with pytest.raises(ConfigError, match="--max-decode-slowdown"):
        PagedEngine(paged_stepper_factory(ref_model), tokenizer, tokenizer.vocab_size, 256, num_blocks=100,
                    block_size=8, max_decode_slowdown=0.5)


def test_a_long_context_decodes_in_its_own_call_and_tokens_equal_generate(ref_model, tokenizer):
    vocab = tokenizer.vocab_size
    engine = _engine(ref_model, tokenizer, max_len=1200, budget=256, block=16, num_blocks=160)
    calls = []
    original = engine._call

    def call(rows, n_rows, width, ctx):
        if width == 1:
            calls.append(sorted(len(s.prompt_ids) for s, _ in rows))
        return original(rows, n_rows, width, ctx)
    engine._call = call
    short, long_prompt = random_ids(5, 3, vocab), random_ids(1030, 4, vocab)
    a, b = _seq(short, 40), _seq(long_prompt, 5)
    _drive(engine, {0: [b, a]})
    assert a.output_ids == _generate(ref_model, short, 40)
    assert b.output_ids == _generate(ref_model, long_prompt, 5)
    # 1030 tokens gather 128 blocks (2048 tokens), the short one 16 (256): never one call for both
    assert [5] in calls and [1030] in calls and [5, 1030] not in calls
