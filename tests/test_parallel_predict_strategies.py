"""Introspection of the model-parallel predict configuration on CPU: built under the semi-auto context, every shipped
predict YAML's model records exactly the intended predict table (kv caches split by whole kv heads, attention heads
split, vocab-parallel embedding and lm_head, the logits gathered); and tracing the real prefill, decode and
slot-clearing steps shows that every primitive they call carries a strategy that fits its inputs."""
from __future__ import annotations

import dataclasses
import glob
import os
from types import SimpleNamespace

import pytest

ms = pytest.importorskip("mindspore")

from telechat_ms.config import TeleChatConfig  # noqa: E402
from telechat_ms.infer.kv_cache import DecodeSession  # noqa: E402
from telechat_ms.job_config import ParallelConfig, load_job_config  # noqa: E402
from telechat_ms.model.telechat import TeleChatForCausalLM  # noqa: E402
from telechat_ms.parallel.parallelize import parallelize_predict  # noqa: E402
from telechat_ms.parallel.predict import ModelParallelStepper, strategies_of  # noqa: E402
from telechat_ms.parallel.strategies import recorded_strategies, resolve  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.predict_trace import strategy_problems, trace  # noqa: E402

PREDICT_YAMLS = sorted(glob.glob(os.path.join(REPO, "yaml_configs", "*", "predict_*.yaml")))

# The intended table in symbols (dp = 1 for predict): "mp" = model_parallel; "V" = the vocab split (mp, or 1 when
# the vocabulary does not divide); FLASH / REPEAT only with flash attention (REPEAT when kv heads are shared).
KV = (1, "mp", 1, 1)
LAYER = {
    "attention.wq.matmul": ((1, 1), ("mp", 1)), "attention.wk_v.matmul": ((1, 1), ("mp", 1)),
    "attention.split_kv": ((1, 1, "mp", 1),), "attention.transpose_q": ((1, 1, "mp", 1),),
    "attention.transpose_k": ((1, 1, "mp", 1),), "attention.transpose_v": ((1, 1, "mp", 1),),
    "attention.rotary.split": (KV,), "attention.rotary.neg": (KV,), "attention.rotary.concat": (KV, KV),
    "attention.rotary.mul_cos": (KV, (1, 1, 1, 1)), "attention.rotary.mul_sin": (KV, (1, 1, 1, 1)),
    "attention.rotary.add": (KV, KV),
    "attention.cache_add": (KV, (1, 1, 1, 1), (1, 1, 1, 1)),      # caches by whole kv heads; updates arrive whole
    # the scratch slot's writes zeroed on the whole index and updates before the add
    "attention.write_slot": ((1, 1, 1, 1),), "attention.not_scratch": ((1, 1, 1, 1), ()),
    "attention.write_cast": ((1, 1, 1, 1),), "attention.write_mul_k": ((1, 1, 1, 1), (1, 1, 1, 1)),
    "attention.write_mul_v": ((1, 1, 1, 1), (1, 1, 1, 1)),
    "attention.cache_qk": (KV, KV), "attention.mul_scale_c": (KV, ()),
    "attention.mask_mul_c": ((1, 1, 1, 1, 1), ()), "attention.mask_add_c": ((1, "mp", 1, 1, 1), (1, 1, 1, 1, 1)),
    "attention.softmax_c": ((1, "mp", 1, 1, 1),), "attention.cache_pv": (KV, KV),
    "attention.transpose_out": (KV,),
    "attention.wo.matmul": ((1, "mp"), (1, "mp")), "attention.wo.bias_add": ((1, 1), (1,)),
    "feed_forward.w1.matmul": ((1, 1), ("mp", 1)), "feed_forward.w3.matmul": ((1, 1), ("mp", 1)),
    "feed_forward.silu.silu": ((1, 1, "mp"),), "feed_forward.mul": ((1, 1, "mp"), (1, 1, "mp")),
    "feed_forward.w2.matmul": ((1, "mp"), (1, "mp")), "feed_forward.w2.bias_add": ((1, 1), (1,)),
    "add_attn": ((1, 1, 1), (1, 1, 1)), "add_ffn": ((1, 1, 1), (1, 1, 1)),
}
S = (1, 1, 1)                                   # the residual stream [B, n, H]: replicated
FUSED_NORM = {"norm": (S, (1,))}
SELF_NORM = {"square": (S,), "mean": (S,), "rsqrt": (S,), "add": (S, ()), "mul": (S, S), "mul2": (S, (1,))}
FLASH = {"attention.flash_attention.flash_attention": (KV, KV, KV, (1, 1, 1, 1))}
REPEAT = {"attention.tile_kv": ((1, "mp", 1, 1, 1),)}
TOP = {"model.tok_embeddings.gather": (("V", 1), (1, 1)), "gather_last": ((1, 1, 1), (1,)),
       "lm_head.matmul": ((1, 1), ("V", 1)), "logits_fp32": ((1, 1, 1),)}
CLEAR = {"clear.keep_mul": (KV, (1, 1, 1, 1)), "clear.assign": (KV, KV)}


def _expand(spec, n):
    if isinstance(spec, tuple):
        return tuple(_expand(s, n) for s in spec)
    return n[spec] if isinstance(spec, str) else spec


def _intended(cfg: TeleChatConfig, mp: int) -> dict:
    n = {"mp": mp, "V": 1 if cfg.vocab_size % mp else mp}
    layer = {**LAYER, **(FLASH if cfg.use_flash_attention else {}),
             **(REPEAT if cfg.use_flash_attention and cfg.n_rep > 1 else {})}
    norm = FUSED_NORM if cfg.fused_rms_norm else SELF_NORM
    for prefix in ("attention_norm", "ffn_norm"):
        layer.update({f"{prefix}.{k}": v for k, v in norm.items()})
    if cfg.is_moe:  # the MoE FFN replaces the dense MLP's entries (tests/moe_tables.py; one replica: dp 1, ep 1)
        from tests.moe_tables import moe_intended
        layer = {k: v for k, v in layer.items() if not k.startswith("feed_forward.")}
        layer.update(moe_intended(1, mp, 1, 1))
    out = {k: _expand(v, n) for k, v in {**TOP, **CLEAR}.items()}
    out.update({f"model.norm_out.{k}": v for k, v in norm.items()})
    for i in range(cfg.n_layer):
        out.update({f"model.layers.{i}.{k}": _expand(v, n) for k, v in layer.items()})
    return out


def _semi_auto(job, mp: int) -> None:
    from telechat_ms.parallel.ascend import set_semi_auto_context
    par = job.parallel
    if par.parallel_mode == "stand_alone":   # 3B / 7B run on one NPU; the predict configuration is the same at mp 1
        par = dataclasses.replace(par, parallel_mode="semi_auto_parallel")
    set_semi_auto_context(par, job.parallel_config, mp, job.source)


@pytest.mark.parametrize("path", PREDICT_YAMLS, ids=[os.path.basename(p) for p in PREDICT_YAMLS])
def test_predict_yaml_under_semi_auto_records_the_intended_table(path):
    from mindspore.parallel import reset_algo_parameters
    job = load_job_config(path)
    full = job.model_config()
    mp = job.parallel_config.model_parallel
    cfg = full.replace(hidden_size=2 * full.n_head, ffn_hidden_size=16 * mp, vocab_size=256 * mp)
    try:
        _semi_auto(job, mp)
        assert ms.get_auto_parallel_context("parallel_mode") == "semi_auto_parallel"
        model = TeleChatForCausalLM(cfg)
        applied = parallelize_predict(model, job.parallel_config, job.source)
        stepper = ModelParallelStepper(model, job.runner_config.batch_size, 64, applied)
        recorded = {k: v.inputs for k, v in recorded_strategies(model).items()}
        recorded.update({f"clear.{k}": v.inputs for k, v in recorded_strategies(stepper.clear).items()})
    finally:
        ms.reset_auto_parallel_context()
        reset_algo_parameters()
    expected = _intended(cfg, mp)
    assert set(recorded) == set(expected), set(recorded) ^ set(expected)
    wrong = {k: (recorded[k], expected[k]) for k in expected if recorded[k] != expected[k]}
    assert not wrong, list(wrong.items())[:3]
    assert {k: v.inputs for k, v in strategies_of(stepper).items()} == recorded
    # the kv caches are cut by whole kv heads: mp divides K, every rank holds K / mp heads of every row and slot
    k = full.num_key_value_heads
    assert k % mp == 0 and set(stepper.cache_splits.values()) == {(1, mp, 1, 1)}
    assert applied.param_splits["model.layers.0.attention.wk_v.weight"] == (mp, 1)   # [k_h; v_h] row pairs


CASES = {  # name: (config, mp)
    "115b_heads_ascend": (dict(n_head=64, num_key_value_heads=8, hidden_size=256, use_flash_attention=True,
                               fused_rms_norm=True), 8),
    "35b_heads_ascend": (dict(n_head=48, num_key_value_heads=48, hidden_size=192, use_flash_attention=True,
                              fused_rms_norm=True), 2),
    "gqa_cpu": (dict(n_head=8, num_key_value_heads=4, hidden_size=64), 4),
}


def _traced_steps(name: str):
    ms.set_context(mode=ms.PYNATIVE_MODE)        # the trace hooks primitive calls: op by op
    fields, mp = CASES[name]
    cfg = TeleChatConfig(n_layer=2, ffn_hidden_size=32 * mp, vocab_size=128 * mp, training_seqlen=16, base_seqlen=16,
                         seq_length=64, **fields)
    model = TeleChatForCausalLM(cfg)
    applied = parallelize_predict(model, ParallelConfig(model_parallel=mp))
    stepper = ModelParallelStepper(model, 2, 64, applied, use_jit=False)
    session = DecodeSession(SimpleNamespace(config=cfg), 2, 64, stepper=stepper)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    graphs = {}
    with trace() as calls:
        session.prefill(prompts)
    graphs["prefill"] = calls
    with trace() as calls:
        session.decode([1, 2])
    graphs["decode"] = calls
    with trace() as calls:                 # a new prompt over written slots: the clearing step runs first
        session.prefill(prompts)
    graphs["prefill again"] = calls
    assert stepper.clears >= 1
    return model, stepper, graphs


@pytest.mark.parametrize("name", list(CASES))
def test_every_primitive_of_prefill_decode_and_clear_carries_a_fitting_strategy(name):
    model, stepper, graphs = _traced_steps(name)
    for graph, calls in graphs.items():
        assert calls, graph
        assert strategy_problems(calls) == [], graph
    kinds = {g: {c.kind for c in calls} for g, calls in graphs.items()}
    flash = model.config.use_flash_attention
    assert "ScatterNdAdd" in kinds["decode"] and "ScatterNdUpdate" not in kinds["decode"] | kinds["prefill"]
    assert ("FlashAttentionScore" in kinds["prefill"]) == flash and "FlashAttentionScore" not in kinds["decode"]
    assert "BatchMatMul" in kinds["decode"] and ("RmsNorm" in kinds["decode"]) == model.config.fused_rms_norm
    assert {"Assign", "Mul"} <= kinds["prefill again"]
    # every declared strategy is used by one of the graphs (the table names no primitive the steps do not run)
    used = {id(c.prim) for calls in graphs.values() for c in calls}
    declared = {path: resolve(model, path) for path in stepper.applied.table}
    declared.update({f"clear.{k}": resolve(stepper.clear, k) for k in stepper.clear_table})
    assert [p for p, prim in declared.items() if id(prim) not in used] == []


def test_the_checker_fails_on_a_primitive_without_strategy_or_with_a_wrong_one():
    model, stepper, graphs = _traced_steps("gqa_cpu")
    qk = model.model.layers[0].attention.cache_qk
    qk.del_prim_attr("in_strategy")
    assert any(p.startswith("BatchMatMul") and "no strategy" in p for p in strategy_problems(graphs["decode"]))
    qk.shard(((1, 4, 1), (1, 4, 1, 1)))          # a 3-entry cut for a 4-D input
    assert any("does not cut an input of shape" in p for p in strategy_problems(graphs["decode"]))
