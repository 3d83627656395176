"""The continuous-batching engine on a real tiny model, driven step by step (Engine.run_once), and the pieces it is
made of: the per-sequence sampler, stop-string output, the tool-call parser."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("mindspore")
pytest.importorskip("fastapi")

from telechat_ms.chat_template import render_tool_call  # noqa: E402
from telechat_ms.infer.sampling import process_logits, select_tokens  # noqa: E402
from telechat_ms.serve.engine import Engine, QueueFull, Sequence  # noqa: E402
from telechat_ms.serve.output import OutputBuilder  # noqa: E402
from telechat_ms.serve.sampler import SamplingParams, SequenceSampler  # noqa: E402
from telechat_ms.serve.server import full_forward_scorer, local_stepper_factory  # noqa: E402
from telechat_ms.serve.tool_parser import ToolCallStream, parse_tool_calls  # noqa: E402
from tests.serve_fixtures import metric, random_ids, ref_model, serve_model_dir, tokenizer  # noqa: E402,F401

ENGINE_LEN = 96


@pytest.fixture(scope="module")
def engine(ref_model, tokenizer):
    """4 rows x 96 slots, driven synchronously; graphs compile on first use and are reused by every test."""
    eng = Engine(local_stepper_factory(ref_model), tokenizer, tokenizer.vocab_size, ENGINE_LEN, max_batch_size=4,
                 max_queue=4, scorer=full_forward_scorer(ref_model), warmup=False)
    eng.prepare()
    return eng


def _seq(ids, sink=None, index=0, **params) -> Sequence:
    params.setdefault("temperature", 0.0)
    return Sequence(list(ids), SamplingParams(**params), sink or (lambda d: None), index=index)


def _drive(engine: Engine, schedule: dict[int, list[Sequence]], limit: int = 400) -> int:
    """Submit sequences at the given iterations and run until everything finished; returns iterations run."""
    last = max(schedule)
    for it in range(limit):
        for seq in schedule.get(it, []):
            engine.submit([seq])
        more = engine.run_once()
        if not more and it >= last:
            return it + 1
    raise AssertionError("engine did not finish")


def _caches(engine: Engine) -> list[np.ndarray]:
    cache = engine.stepper.cache
    return [p.asnumpy().copy() for p in list(cache.k) + list(cache.v)]


def test_rows_that_are_not_prefilled_keep_their_cache_slots(engine, tokenizer):
    vocab = tokenizer.vocab_size
    a = _seq(random_ids(10, 1, vocab), max_tokens=30)
    engine.submit([a])
    for _ in range(4):           # prefill + 3 decode steps: a's tokens sit in slots 0..12
        engine.run_once()
    assert a.row is not None and a.cached == 13
    before = _caches(engine)
    b = _seq(random_ids(50, 2, vocab), max_tokens=5)
    engine.submit([b])
    engine.run_once()            # one step: b's 50-token prefill (width 64) and a's next token together
    assert a.cached == 14 and b.cached == 50
    after = _caches(engine)
    idle = [r for r in range(engine.batch) if r not in (a.row, b.row)]
    for old, new in zip(before, after):
        assert np.array_equal(old[a.row, :, :13], new[a.row, :, :13])       # a's live slots untouched
        assert not np.array_equal(old[a.row, :, 13], new[a.row, :, 13])     # a wrote its new token at slot 13
        assert np.array_equal(old[a.row, :, 14:engine.scratch], new[a.row, :, 14:engine.scratch])
        for r in idle:                                                       # idle rows: only scratch changes
            assert np.array_equal(old[r, :, :engine.scratch], new[r, :, :engine.scratch])
    a.cancelled = b.cancelled = True
    engine.run_once()
    assert all(r is None for r in engine.rows)


def test_greedy_answer_does_not_depend_on_batch_mates(engine, ref_model, tokenizer):
    vocab = tokenizer.vocab_size
    prompt = random_ids(21, 3, vocab)
    alone = _seq(prompt, max_tokens=40)
    _drive(engine, {0: [alone]})
    mates = [_seq(random_ids(n, 10 + n, vocab), max_tokens=m) for n, m in ((5, 50), (60, 12), (33, 20))]
    batched = _seq(prompt, max_tokens=40)
    _drive(engine, {0: [mates[0]], 2: [batched], 5: [mates[1]], 9: [mates[2]]})
    reference = ref_model.generate([prompt], max_new_tokens=40, eos_token_id=None).new_tokens[0]
    assert alone.output_ids == batched.output_ids == reference
    # mates joined while others were decoding
    assert metric(engine.metrics.render().decode(), "telechat_mixed_steps_total") >= 2


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates(engine, ref_model, tokenizer):
    vocab = tokenizer.vocab_size
    prompt = random_ids(12, 4, vocab)
    opts = dict(max_tokens=24, temperature=0.9, seed=1234)
    alone = _seq(prompt, **opts)
    _drive(engine, {0: [alone]})
    batched = _seq(prompt, **opts)
    other_choice = Sequence(list(prompt), SamplingParams(**opts), lambda d: None, index=1, choice=1)
    mates = [_seq(random_ids(7, 5, vocab), max_tokens=30, temperature=1.0, seed=9)]
    _drive(engine, {0: mates, 3: [batched, other_choice]})
    reference = ref_model.generate([prompt], max_new_tokens=24, do_sample=True, temperature=0.9, seed=1234,
                                   eos_token_id=None).new_tokens[0]
    assert alone.output_ids == batched.output_ids == reference
    assert other_choice.output_ids != alone.output_ids


def test_cancel_frees_the_row_before_the_next_step(engine, tokenizer):
    got = []
    seq = _seq(random_ids(9, 6, tokenizer.vocab_size), sink=got.append, max_tokens=80)
    engine.submit([seq])
    for _ in range(5):
        engine.run_once()
    aborts = metric(engine.metrics.render().decode(), "telechat_requests_finished_total", finished_reason="abort")
    steps = engine.step_count
    engine.cancel(seq)
    engine.run_once()
    assert seq.row is not None and engine.rows[seq.row] is None
    assert engine.step_count == steps            # freed before any further step
    assert got[-1].finish_reason == "abort" and len(seq.output_ids) == 5
    text = engine.metrics.render().decode()
    assert metric(text, "telechat_requests_finished_total", finished_reason="abort") == aborts + 1
    assert metric(text, "telechat_abort_to_free_steps_bucket", le="0.0") >= 1


def test_full_queue_answers_503_with_retry_after(ref_model, tokenizer):
    import httpx
    from telechat_ms.infer.gen_config import GenerationConfig
    from telechat_ms.serve.app import create_app
    from telechat_ms.serve.state import ServeState
    eng = Engine(local_stepper_factory(ref_model), tokenizer, tokenizer.vocab_size, ENGINE_LEN, max_batch_size=1,
                 max_queue=1, warmup=False)
    eng.prepare()                       # not stepping: whatever is submitted stays queued
    eng.submit([_seq([10, 11], max_tokens=4)])    # takes the free row's place
    eng.submit([_seq([10, 11], max_tokens=4)])    # the one queue place
    with pytest.raises(QueueFull):
        eng.submit([_seq([10, 11], max_tokens=4)])
    app = create_app(ServeState(eng, tokenizer, "tiny", GenerationConfig()))

    async def call():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/v1/completions", json={"prompt": [10, 11], "max_tokens": 3})
    resp = asyncio.run(call())
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["type"] == "ServiceUnavailable" and "--max-queue 1" in resp.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- sampler
def test_sampler_matches_the_generate_processors_and_draws():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=64).astype(np.float32) * 3
    prompt = [3, 5, 9, 9]
    p = SamplingParams(max_tokens=1, temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3, seed=11)
    sampler = SequenceSampler(p, prompt, 64, np.random.default_rng(11))
    expected = process_logits(logits[None], [prompt], True, 0.7, 10, 0.8, 1.3)
    assert np.array_equal(sampler.scores(logits), expected)
    assert sampler.pick(logits) == int(select_tokens(expected, True, np.random.default_rng(11))[0])
    greedy = SequenceSampler(SamplingParams(max_tokens=1, temperature=0.0, repetition_penalty=1.3), prompt, 64, None)
    assert greedy.pick(logits) == int(process_logits(logits[None], [prompt], False, repetition_penalty=1.3).argmax())


def test_presence_frequency_penalties_min_p_and_logit_bias():
    p = SamplingParams(max_tokens=1, temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25,
                       logit_bias={7: 3.0})
    sampler = SequenceSampler(p, [1, 2], 16, None)
    for t in (5, 5, 6):
        sampler.record(t)
    scores = sampler.scores(np.zeros(16, np.float32))[0]
    assert scores[5] == pytest.approx(-(2 * 0.25 + 0.5)) and scores[6] == pytest.approx(-(0.25 + 0.5))
    assert scores[7] == 3.0 and scores[1] == 0.0      # prompt ids are not OpenAI-penalised
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    kept = SequenceSampler(SamplingParams(max_tokens=1, temperature=1.0, min_p=0.2), [], 4, None).scores(logits)[0]
    assert np.isfinite(kept[:3]).all() and kept[3] == -np.inf     # 0.05 < 0.2 * 0.5


# ---------------------------------------------------------------------------------------------- output
def test_stop_strings_never_stream_half_a_stop(tokenizer):
    ids = random_ids(60, 7, tokenizer.vocab_size)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    builder = OutputBuilder(tokenizer, (stop, "never-there"))
    pieces = []
    for token in ids:
        pieces.append(builder.add(token))
        assert stop not in "".join(pieces)
        if builder.stopped_by:
            break
    assert builder.stopped_by == stop
    assert "".join(pieces) == full[:full.find(stop)]
    plain = OutputBuilder(tokenizer)
    assert "".join(plain.add(t) for t in ids) + plain.finish() == full


# ---------------------------------------------------------------------------------------------- tool calls
CALLS = [{"name": "get_weather", "arguments": {"city": "北京", "unit": "celsius"}},
         {"function": {"name": "lookup", "arguments": "{\"q\": \"TeleChat\"}"}}]


def _released_answer() -> str:
    """An answer written exactly as the released template renders an assistant's tool calls."""
    return "好的，我来查一下。\n" + "\n".join(render_tool_call(c) for c in CALLS)


def test_parser_turns_released_tool_call_text_into_tool_calls():
    content, calls = parse_tool_calls(_released_answer())
    assert content == "好的，我来查一下。\n"
    assert [c.name for c in calls] == ["get_weather", "lookup"]
    assert [c.arguments for c in calls] == ['{"city": "北京", "unit": "celsius"}', '{"q": "TeleChat"}']
    assert all(c.to_openai()["id"].startswith("call_") and c.to_openai()["type"] == "function" for c in calls)
    assert len({c.id for c in calls}) == 2
    only = parse_tool_calls(render_tool_call(CALLS[0]))
    assert only[0] is None and len(only[1]) == 1
    broken = "x <tool_call>\n{\"name\": \"f\", \"arguments\": {\n</tool_call>"
    assert parse_tool_calls(broken) == (broken, [])        # not valid JSON: stays text, no call invented
    cut = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"a": 1}}')   # stopped before the close tag
    assert cut[1][0].name == "f" and cut[1][0].arguments == '{"a": 1}'


def test_tool_call_stream_equals_whole_parse_for_every_split():
    text = _released_answer()
    whole_content, whole_calls = parse_tool_calls(text)
    for cut in range(1, len(text), 3):
        stream = ToolCallStream()
        sent = stream.feed(text[:cut]) + stream.feed(text[cut:])
        assert "<tool_call" not in sent
        rest, calls = stream.finish()
        assert sent + rest == whole_content
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
