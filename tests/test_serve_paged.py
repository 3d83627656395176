"""The paged engine (telechat_ms.serve.paged_engine) on real tiny models, driven step by step: greedy answers equal
one-sequence generate (and the torch reference) with chunked prefill, batch mates, prefix caching, eviction and
preemption; blocks come back; the block-count and activation arithmetic that sizes the serving memory."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mindspore")
pytest.importorskip("fastapi")

from telechat_ms.infer.paged import (ATTN_CONTEXT, DEFAULT_KV_CACHE_BYTES, call_activation_bytes,  # noqa: E402
                                     kv_bytes_per_token, plan_num_blocks, step_activation_bytes)
from telechat_ms.serve.paged_engine import PagedEngine, chunk_widths, context_blocks  # noqa: E402
from telechat_ms.serve.sampler import SamplingParams  # noqa: E402
from telechat_ms.serve.sequence import Sequence  # noqa: E402
from telechat_ms.serve.server import full_forward_scorer, paged_stepper_factory  # noqa: E402
from tests import serve_fixtures as fx  # noqa: E402
from tests.serve_fixtures import metric, random_ids  # noqa: E402

serve_model_dir, tokenizer, ref_model = fx.serve_model_dir, fx.tokenizer, fx.ref_model   # module fixtures

LEN = 256
BLOCK = 8


def _engine(model, tokenizer, num_blocks=80, budget=32, batch=4, prefix_caching=True) -> PagedEngine:
    eng = PagedEngine(paged_stepper_factory(model), tokenizer, tokenizer.vocab_size, LEN, num_blocks=num_blocks,
                      block_size=BLOCK, max_num_batched_tokens=budget, prefix_caching=prefix_caching,
                      max_batch_size=batch, max_queue=16, scorer=full_forward_scorer(model), warmup=False)
    eng.prepare()
    return eng


@pytest.fixture(scope="module")
def engine(ref_model, tokenizer):
    return _engine(ref_model, tokenizer)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory, tokenizer):
    """The served architecture with training_seqlen 256: every prompt here takes the same rotary tables, so
    prefixes are shared exactly (past training_seqlen each length has its own and nothing is reused)."""
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    path = str(tmp_path_factory.mktemp("paged") / "m256")
    write_random_hf_checkpoint(path, tiny_config(vocab_size=tokenizer.vocab_size, training_seqlen=256,
                                                 base_seqlen=256, seq_length=256), qk_scale=4.0, seed=3)
    return TeleChatForCausalLM.from_pretrained(path)


def _seq(ids, **params) -> Sequence:
    params.setdefault("temperature", 0.0)
    return Sequence(list(ids), SamplingParams(**params), lambda d: None)


def _drive(engine, schedule: dict[int, list[Sequence]], limit: int = 2000) -> None:
    last = max(schedule)
    for it in range(limit):
        for seq in schedule.get(it, []):
            engine.submit([seq])
        if not engine.run_once() and it >= last:
            return
    raise AssertionError("engine did not finish")


def _generate(model, prompt, n):
    return model.generate([prompt], max_new_tokens=n, eos_token_id=None).new_tokens[0]


def _all_blocks_back(engine) -> None:
    b = engine.blocks
    assert all(r == 0 for r in b.ref) and b.num_free == b.usable
    assert sorted(list(b.free) + list(b.evictable)) == list(range(1, b.num_blocks))


def test_chunked_prefill_and_batch_mates_give_one_sequence_generate(engine, ref_model, tokenizer):
    vocab = tokenizer.vocab_size
    jobs = [(random_ids(n, 40 + n, vocab), m) for n, m in ((5, 30), (70, 12), (21, 25), (100, 8))]
    seqs = [_seq(p, max_tokens=m) for p, m in jobs]
    _drive(engine, {0: seqs[:1], 2: seqs[1:2], 3: seqs[2:3], 6: seqs[3:]})
    for seq, (prompt, m) in zip(seqs, jobs):       # 70 and 100 tokens: several 32-token chunks, past the NTK bound
        assert seq.output_ids == _generate(ref_model, prompt, m), len(prompt)
    text = engine.metrics.render().decode()
    assert metric(text, "telechat_prefill_chunks_total") >= 3 + 4 + 1 + 1
    assert metric(text, "telechat_mixed_steps_total") >= 2      # chunks computed while others decoded
    shapes = engine.stepper.shapes
    assert all(w in (1, 32) for _, w, _ in shapes) and all(r == 1 for r, w, _ in shapes if w > 1)
    assert (1, 1, 256 // BLOCK) in shapes       # one decoding sequence: one row, the smallest context
    _all_blocks_back(engine)


def test_long_prompt_in_chunks_equals_generate_and_the_torch_reference(engine, ref_model, serve_model_dir,
                                                                       tokenizer):
    torch = pytest.importorskip("torch")
    from telechat_ms.reference.torch_model import TeleChatRef
    prompt = random_ids(200, 7, tokenizer.vocab_size)     # 7 chunks of 32, ~6x training_seqlen
    seq = _seq(prompt, max_tokens=12)
    _drive(engine, {0: [seq]})
    ref = TeleChatRef.from_pretrained(serve_model_dir)
    torch_tokens = ref.generate(torch.tensor([prompt]), 12, eos_token_id=None).sequences[0].tolist()[200:]
    assert seq.output_ids == _generate(ref_model, prompt, 12) == torch_tokens


def test_cancel_gives_the_blocks_back(engine, tokenizer):
    seq = _seq(random_ids(40, 8, tokenizer.vocab_size), max_tokens=50)
    engine.submit([seq])
    for _ in range(4):
        engine.run_once()
    assert engine.blocks.num_used >= 5
    engine.cancel(seq)
    engine.run_once()
    assert engine.rows[seq.row] is None and seq.blocks == []
    _all_blocks_back(engine)


def test_prefix_cache_shares_blocks_and_changes_no_token(long_model, tokenizer):
    vocab = tokenizer.vocab_size
    system = random_ids(43, 11, vocab)
    first, diverging, more = system + random_ids(9, 12, vocab), system + random_ids(14, 13, vocab), \
        random_ids(20, 14, vocab)
    runs = {}
    for caching in (True, False):
        eng = _engine(long_model, tokenizer, prefix_caching=caching)
        outs, prompts = [], []
        for i in range(4):   # a prompt, one diverging after the shared 43 tokens, a next turn of the first, a repeat
            p = [first, diverging, None, diverging][i] or first + outs[0][0] + more
            seq = _seq(p, max_tokens=10)
            _drive(eng, {0: [seq]})
            outs.append((seq.output_ids, seq.reused_tokens))
            prompts.append(p)
        runs[caching] = (outs, prompts)
        text = eng.metrics.render().decode()
        hits = metric(text, "telechat_prefix_cache_hits_total")
        if caching:
            # diverging: the 5 full blocks of the shared 43 tokens; the next turn: the first's 52 prompt + 9 of its
            # 10 answer tokens were computed (the last one never is): 7 full blocks; the repeat of the 57-token
            # prompt: (57 - 1) // 8 = 7 blocks (its last token is always computed, for its logits)
            assert [r for _, r in outs] == [0, 40, 56, 56]
            assert hits == 40 + 56 + 56
            assert metric(text, "telechat_prefix_cache_queries_total") == \
                sum(((len(p) - 1) // BLOCK) * BLOCK for p in prompts)
        else:
            assert hits == 0 and [r for _, r in outs] == [0, 0, 0, 0]
        _all_blocks_back(eng)
    assert runs[True][1] == runs[False][1]
    assert [o for o, _ in runs[True][0]] == [o for o, _ in runs[False][0]] == \
        [_generate(long_model, p, 10) for p in runs[True][1]]


def test_shared_prefix_blocks_are_reference_counted_while_both_run(long_model, tokenizer):
    vocab = tokenizer.vocab_size
    eng = _engine(long_model, tokenizer)
    system = random_ids(32, 21, vocab)
    first = _seq(system + random_ids(5, 22, vocab), max_tokens=30)
    _drive(eng, {0: [first]})
    a, b = (_seq(system + random_ids(6, s, vocab), max_tokens=20) for s in (23, 24))
    eng.submit([a, b])
    eng.run_once()
    shared = a.blocks[:4]
    assert shared == b.blocks[:4] and all(eng.blocks.ref[x] == 2 for x in shared)   # first's 4 cached blocks
    assert a.reused_tokens == b.reused_tokens == 32 and all(x in eng.blocks.hash_of for x in shared)
    assert len(set(a.blocks[4:]) | set(b.blocks[4:])) == len(a.blocks[4:]) + len(b.blocks[4:])   # tails: own
    while eng.run_once():
        pass
    _all_blocks_back(eng)
    for seq in (a, b):
        assert seq.output_ids == _generate(long_model, seq.prompt_ids, 20)


def test_eviction_and_preemption_under_memory_pressure(long_model, tokenizer):
    vocab = tokenizer.vocab_size
    # 33 usable blocks of 8 = 264 token slots: one 256-token sequence fits, four of ~90 tokens do not
    eng = _engine(long_model, tokenizer, num_blocks=33, budget=32)
    jobs = [(random_ids(60, 30 + i, vocab), 30) for i in range(4)]
    seqs = [_seq(p, max_tokens=m) for p, m in jobs]
    _drive(eng, {0: seqs})
    text = eng.metrics.render().decode()
    assert metric(text, "telechat_num_preemptions_total") >= 1
    for seq, (prompt, m) in zip(seqs, jobs):
        assert seq.output_ids == _generate(long_model, prompt, m)
    _all_blocks_back(eng)
    cached = len(eng.blocks.by_hash)
    assert cached > 0
    again = [_seq(random_ids(120, 50 + i, vocab), max_tokens=40) for i in range(2)]   # needs the cached blocks
    _drive(eng, {0: again})
    assert eng.blocks.evictions > 0
    for seq in again:
        assert seq.output_ids == _generate(long_model, seq.prompt_ids, 40)
    _all_blocks_back(eng)


def test_a_prompt_past_max_model_len_fails_alone(engine, tokenizer):
    got = []
    bad = Sequence(random_ids(LEN, 9, tokenizer.vocab_size), SamplingParams(temperature=0.0, max_tokens=4), got.append)
    good = _seq(random_ids(6, 10, tokenizer.vocab_size), max_tokens=3)
    _drive(engine, {0: [bad, good]})
    assert got[-1].finish_reason == "error" and "--max-model-len 256" in got[-1].error
    assert len(good.output_ids) == 3
    _all_blocks_back(engine)


def test_a_cache_too_small_for_one_sequence_is_a_config_error(ref_model, tokenizer):
    from telechat_ms.errors import ConfigError
    with pytest.raises(ConfigError, match="cannot hold one sequence of --max-model-len 256"):
        _engine(ref_model, tokenizer, num_blocks=32)       # 31 usable blocks of 8 < 32


def test_block_count_and_activation_arithmetic_bound_the_serving_memory():
    from telechat_ms.config import TeleChatConfig
    # the serve benchmark's model: hidden 256, 4 layers, 8 heads / 2 kv heads (d 32), fp32
    cfg = TeleChatConfig(hidden_size=256, n_layer=4, n_head=8, num_key_value_heads=2, ffn_hidden_size=688,
                         vocab_size=1024, training_seqlen=8192, base_seqlen=8192, seq_length=8192,
                         compute_dtype="float32", param_dtype="float32")
    per_token = kv_bytes_per_token(cfg)
    assert per_token == 2 * 4 * 2 * 32 * 4 == 2048
    # the cache: never more than 8 sequences at full length, else the 1 GiB default budget, or what is asked for
    assert plan_num_blocks(cfg, 256, 8, 16) == 8 * 16 + 1
    assert plan_num_blocks(cfg, 32768, 8, 16) == 8 * 2048 + 1                    # 512 MiB + a block < 1 GiB
    assert plan_num_blocks(cfg, 131072, 8, 16) == DEFAULT_KV_CACHE_BYTES // (2048 * 16) == 32768
    assert plan_num_blocks(cfg, 32768, 8, 16, memory_bytes=64 << 20) == 2048
    assert plan_num_blocks(cfg, 32768, 8, 16, num_blocks=100) == 100
    # a step's activations: the scheduler keeps a chunk's width x context within budget x ATTN_CONTEXT
    assert call_activation_bytes(cfg, 1, 512, 4096) == (2 * 8 * 512 * 4096 * 4 + 512 * 4096 * 9
                                                        + 4 * 4096 * 2 * 32 * 4 + 512 * (5 * 256 + 4 * 688) * 4
                                                        + 1024 * 4)
    small, large = step_activation_bytes(cfg, 512, 8, 256), step_activation_bytes(cfg, 512, 8, 32768)
    assert small == call_activation_bytes(cfg, 1, 512, 256)
    # at 32768: the decode call of 8 rows gathering 32768 slots each, or a chunk of area 512 x 4096 (32 wide x
    # 32768 = 1M is below it)
    assert large == max(call_activation_bytes(cfg, 8, 1, 32768),
                        call_activation_bytes(cfg, 1, 512, 32768, area=512 * ATTN_CONTEXT))
    assert large < 300 << 20      # vs 8 rows x 8 heads x 32768^2 fp32 scores (275 GB) for an unchunked design
    # the scheduler keeps to that area at every point of a 32768-token prompt
    widths = chunk_widths(512)
    assert widths == [32, 64, 128, 256, 512]
    area = 512 * ATTN_CONTEXT
    for start in range(0, 32768 - 512, 512):
        n = PagedEngine._chunk_len(_Shim(widths, area), start, 512)
        w = next(x for x in widths if x >= n)
        assert n >= 32 and w * context_blocks(-(-(start + n) // 16), 16, 2048) * 16 <= max(area, 32 * 32768)


class _Shim:
    """What PagedEngine._chunk_len reads."""

    def __init__(self, widths, area):
        self.widths, self.area, self.block_size, self.max_blocks = widths, area, 16, 2048


def test_plan_speaks_the_paged_engine_terms():
    from telechat_ms.job_config import load_job_config as load_job
    from telechat_ms.parallel.plan import GIB, format_plan, make_plan
    from tests.conftest import REPO
    report = make_plan(load_job(f"{REPO}/yaml_configs/7b/predict_telechat2_7b.yaml"))
    g, cfg = report.predict.paged, None
    weights = report.stages[0].parts["weights"]
    assert g["free"] == report.limit_gib * GIB - weights - g["activations"]
    per_block = 2 * 30 * 32 * 128 * 2 * 16 / report.dims.mp          # 7B: 30 layers, 32 kv heads of 128, bf16
    assert g["blocks"] == int(g["free"] // per_block) and g["at_seq"] == g["blocks"] // (8192 // 16)
    assert g["at_2048"] == g["blocks"] // 128 and g["budget"] == 512 and cfg is None
    assert f"{g['blocks']} blocks per NPU" in format_plan(report)


def test_head_major_cache_equals_the_slot_major_layout(tiny_gqa_ckpt):
    """The one-process layout [K * slots, d] (no transpose after the gather) computes what the model-parallel
    slot-major [slots, K, d] does: the same logits over a chunked prefill and decodes, the same cache contents."""
    from telechat_ms.infer.paged import PagedStepper
    from telechat_ms.model.telechat import TeleChatForCausalLM
    model = TeleChatForCausalLM.from_pretrained(tiny_gqa_ckpt)
    cfg, bs, nb = model.config, 8, 6
    heads = PagedStepper(model, nb, bs, use_jit=False)
    slots_major = PagedStepper(model, nb, bs, use_jit=False, head_major=False)
    assert heads.head_major and not slots_major.head_major
    assert tuple(heads.cache.k[0].shape) == (cfg.num_key_value_heads * nb * bs, cfg.head_dim)
    assert tuple(slots_major.cache.k[0].shape) == (nb * bs, cfg.num_key_value_heads, cfg.head_dim)
    ids = np.random.default_rng(3).integers(3, cfg.vocab_size, size=13)
    table = np.array([[2, 4, 0, 0]], np.int32)        # blocks 2 and 4, then the null block
    slot = lambda p: table[0, p // bs] * bs + p % bs  # noqa: E731
    # a 13-token prompt in two chunks, then three decoded tokens at positions 13, 14, 15
    calls = [(ids[:9], 0), (ids[9:13], 9), (ids[[3]], 13), (ids[[7]], 14), (ids[[11]], 15)]
    for chunk, start in calls:
        pos = np.arange(start, start + len(chunk))[None]
        args = (chunk[None].astype(np.int32), pos, np.maximum(pos + 1, 13), np.vectorize(slot)(pos), table,
                len(chunk) - 1)
        a, b = heads.step(*args), slots_major.step(*args)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    for layer in range(cfg.n_layer):
        for got, want in ((heads.cache.k[layer], slots_major.cache.k[layer]),
                          (heads.cache.v[layer], slots_major.cache.v[layer])):
            per_head = got.asnumpy().reshape(cfg.num_key_value_heads, nb * bs, cfg.head_dim).transpose(1, 0, 2)
            np.testing.assert_array_equal(per_head, want.asnumpy())
