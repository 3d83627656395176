"""Introspection: every shipped Ascend YAML, applied to a CPU-built TeleChat2 with the same head / kv-head / layer
structure (tiny hidden sizes), records exactly the intended shard strategy on every parallelised primitive,
the intended pipeline stage per layer, and the intended recompute per layer."""
from __future__ import annotations

import glob
import os

import pytest

from telechat_ms.job_config import load_job_config
from tests.conftest import REPO

ASCEND_YAMLS = sorted(glob.glob(os.path.join(REPO, "yaml_configs", "*", "*.yaml")))
ASCEND_YAMLS = [p for p in ASCEND_YAMLS if os.sep + "tiny" + os.sep not in p]

# The intended table, written as MindFormers' conventions in symbols: R = dp*cp rows of the 2-D matmul inputs,
# S = sequence split of the residual stream (cp, times mp with sequence parallel), H = heads split inside
# attention (mp x Ulysses degree), C = ring-attention sequence split, O = output rows after a row-parallel
# matmul (R*mp with sequence parallel, else R), B = batch split of the rope tables and mask (dp).
LAYER = {
    "attention.wq.matmul": ((("R", 1), ("mp", 1)), None),            # column parallel
    "attention.wk_v.matmul": ((("R", 1), ("mp", 1)), None),          # column parallel, whole [k_h; v_h] pairs
    "attention.split_kv": ((("dp", "cp", "mp", 1),), None),
    "attention.transpose_q": ((("dp", "cp", "mp", 1),), None),
    "attention.transpose_k": ((("dp", "cp", "mp", 1),), None),
    "attention.transpose_v": ((("dp", "cp", "mp", 1),), None),
    "attention.rotary.split": ((("dp", "H", "C", 1),), None),
    "attention.rotary.neg": ((("dp", "H", "C", 1),), None),
    "attention.rotary.concat": ((("dp", "H", "C", 1), ("dp", "H", "C", 1)), None),
    "attention.rotary.mul_cos": ((("dp", "H", "C", 1), "TABLE"), None),
    "attention.rotary.mul_sin": ((("dp", "H", "C", 1), "TABLE"), None),
    "attention.rotary.add": ((("dp", "H", "C", 1), ("dp", "H", "C", 1)), None),
    "attention.transpose_out": ((("dp", "mp", "cp", 1),), None),
    "attention.wo.matmul": ((("R", "mp"), (1, "mp")), "REDUCE"),     # row parallel
    "attention.wo.bias_add": ((("O", 1), (1,)), None),
    "feed_forward.w1.matmul": ((("R", 1), ("mp", 1)), None),
    "feed_forward.w3.matmul": ((("R", 1), ("mp", 1)), None),
    "feed_forward.silu.silu": ((("dp", "cp", "mp"),), None),
    "feed_forward.mul": ((("dp", "cp", "mp"), ("dp", "cp", "mp")), None),
    "feed_forward.w2.matmul": ((("R", "mp"), (1, "mp")), "REDUCE"),  # row parallel
    "feed_forward.w2.bias_add": ((("O", 1), (1,)), None),
    "add_attn": ((("dp", "S", 1), ("dp", "S", 1)), None),
    "add_ffn": ((("dp", "S", 1), ("dp", "S", 1)), None),
}
FLASH = {"attention.flash_attention.flash_attention":
         ((("dp", "H", "C", 1), ("dp", "H", "C", 1), ("dp", "H", "C", 1), ("B", 1, "C", 1)), None)}
FUSED_NORM = {"norm": ((("dp", "S", 1), (1,)), None)}
TOP = {
    "model.tok_embeddings.gather": ((("mp*cp", 1), ("dp", 1)), None),  # vocab-parallel embedding
    "lm_head.matmul": ((("R", 1), ("mp", 1)), None),                  # vocab-parallel lm_head
    "log_softmax": ((("R*mp", 1),), None),                            # row-parallel loss
    "gather_d": ((("R*mp", 1), ("R*mp", 1)), None),
}


def _expand(spec, n: dict) -> tuple:
    if spec == "TABLE":
        return (n["B"], 1, n["C"], 1) if n["B_inputs"] else (n["C"], 1)
    if isinstance(spec, tuple):
        return tuple(_expand(s, n) for s in spec)
    if isinstance(spec, str):
        value = 1
        for part in spec.split("*"):
            value *= n[part]
        return value
    return spec


def intended_table(job, n_layer: int) -> dict:
    """The hand-written table above, evaluated for this job's degrees."""
    pc = job.parallel_config
    dp, mp, cp = pc.data_parallel, pc.model_parallel, pc.context_parallel
    ulysses = cp if pc.context_parallel_algo == "ulysses_cp" else 1
    n = {"dp": dp, "mp": mp, "cp": cp, "R": dp * cp, "S": cp * (mp if pc.use_seq_parallel else 1),
         "H": mp * ulysses, "C": cp // ulysses, "O": dp * cp * (mp if pc.use_seq_parallel else 1),
         "B": dp, "B_inputs": True}
    reduce = ((dp * cp * mp, 1),) if pc.use_seq_parallel else None
    layer = {**LAYER, **FLASH}
    moe = {}
    if job.model_config().is_moe:  # the MoE FFN replaces the dense MLP's entries (tests/moe_tables.py)
        from tests.moe_tables import moe_intended
        layer = {k: v for k, v in layer.items() if not k.startswith("feed_forward.")}
        sp = mp if pc.use_seq_parallel else 1
        moe = moe_intended(pc.expert_parallel, mp, dp * cp * sp, dp * cp // pc.expert_parallel)
    out = {}
    for i in range(n_layer):
        for key, (ins, outs) in layer.items():
            out[f"model.layers.{i}.{key}"] = (_expand(ins, n), reduce if outs == "REDUCE" else None)
        out.update({f"model.layers.{i}.{k}": (v, None) for k, v in moe.items()})
        for norm in ("attention_norm", "ffn_norm"):
            out[f"model.layers.{i}.{norm}.norm"] = (_expand(FUSED_NORM["norm"][0], n), None)
    for key, (ins, _) in TOP.items():
        out[key] = (_expand(ins, n), None)
    out["model.norm_out.norm"] = (_expand(FUSED_NORM["norm"][0], n), None)
    return out


def _groups() -> dict:
    """Shipped YAMLs grouped by everything the strategies depend on (pretrain and finetune often coincide)."""
    groups: dict = {}
    for path in ASCEND_YAMLS:
        job = load_job_config(path)
        key = (job.model.model_config.get("preset"), repr(job.parallel_config), repr(job.recompute_config),
               repr(job.model.pipeline_offset), job.run_mode == "predict")
        groups.setdefault(key, []).append(path)
    return groups


GROUPS = [paths for key, paths in _groups().items() if not key[-1]]   # predict YAMLs: test_parallel_predict_*


def test_every_size_ships_pretrain_finetune_predict_and_32k():
    names = {os.path.relpath(p, os.path.join(REPO, "yaml_configs")) for p in ASCEND_YAMLS}
    for size in ("3b", "7b", "35b", "115b"):
        for mode in ("pretrain", "finetune", "predict"):
            assert f"{size}/{mode}_telechat2_{size}.yaml" in names
    assert {"7b/finetune_telechat2_7b_32k.yaml", "115b/finetune_telechat2_115b_32k.yaml"} <= names


def _tiny_model(job):
    """The YAML's model with head_dim 2 and small ffn / vocab: same heads, kv heads and layers."""
    from telechat_ms.model.telechat import TeleChatForCausalLM
    cfg = job.model_config()
    tiny = cfg.replace(hidden_size=2 * cfg.n_head, ffn_hidden_size=16 * job.parallel_config.model_parallel,
                       vocab_size=256)
    return TeleChatForCausalLM(tiny)


@pytest.mark.parametrize("paths", GROUPS, ids=[os.path.basename(g[0]) for g in GROUPS])
def test_recorded_strategies_equal_the_intended_table(paths):
    from telechat_ms.parallel.parallelize import parallelize
    from telechat_ms.parallel.strategies import recorded_strategies

    job = load_job_config(paths[0])
    model = _tiny_model(job)
    applied = parallelize(model, job.parallel_config, job.recompute_config, job.parallel, job.model,
                          job.runner_config.seq_length or model.config.seq_length, batched_inputs=True,
                          source=job.source)
    recorded = {k: (v.inputs, v.outputs) for k, v in recorded_strategies(model).items()}
    expected = intended_table(job, model.config.n_layer)
    # the strategies shard the primitives autodiff differentiates: no hand-written backward stays on
    assert not model.nll_bprop and not any(layer.attention.softmax_bprop for layer in model.model.layers)
    assert not any(layer.attention.rotary.full_tables for layer in model.model.layers)
    assert not any(cell.hand_bprop for _, cell in model.cells_and_names() if hasattr(cell, "hand_bprop"))
    assert set(recorded) == set(expected), (set(recorded) ^ set(expected))
    wrong = {k: (recorded[k], expected[k]) for k in expected if recorded[k] != expected[k]}
    assert not wrong, f"{paths}: {list(wrong.items())[:3]}"

    pc, layers = job.parallel_config, model.model.layers
    if pc.pipeline_stage > 1:
        stages = [layer.pipeline_stage for layer in layers]
        per_stage = [stages.count(s) for s in range(pc.pipeline_stage)]
        preset = job.model.model_config["preset"]
        assert per_stage == {"35b": [15, 17, 17, 15], "115b": [10, 11, 12, 13, 13, 13, 13, 11],
                             "telechat2_39b_a12b": [15, 15]}[preset]
        assert model.model.tok_embeddings.pipeline_stage == 0
        assert model.lm_head.pipeline_stage == model.model.norm_out.pipeline_stage == pc.pipeline_stage - 1
        if pc.pp_interleave_num > 1:  # chunk-major order: chunks of 30, 31 and 35 layers; stage 0 leads each
            assert [i for i, s in enumerate(stages) if s == 0] == [0, 1, 2, 30, 31, 32, 61, 62, 63, 64]
    else:
        assert all(getattr(layer, "pipeline_stage", 0) == 0 for layer in layers)
    rc = job.recompute_config
    full = [bool(getattr(layer, "_has_config_recompute", False)) for layer in layers]
    select = [bool(getattr(layer.feed_forward, "ffn", layer.feed_forward).mul.attrs.get("recompute"))
              for layer in layers]
    comm = [bool(layer.attention_norm.norm.attrs.get("recompute_comm_op")) for layer in layers]
    if isinstance(rc.recompute, list):  # per-stage counts of fully recomputed layers (39B-A12B: [3, 0])
        assert sum(full) == sum(rc.recompute) and not any(select)
    elif rc.recompute is True:  # (Cell.recompute marks the cell's own comm ops itself: mp_comm_recompute)
        assert all(full) and not any(select)
    else:
        assert not any(full) and all(select) == bool(rc.select_recompute)
        assert sum(comm) == (sum(rc.select_comm_recompute) if isinstance(rc.select_comm_recompute, list) else 0)
        assert sorted(applied.comm_recompute) == [i for i, c in enumerate(comm) if c]
    ring = [layer.attention.flash_attention.flash_attention.attrs.get("enable_ring_attention") for layer in layers]
    ring_expected = pc.context_parallel > 1 and pc.context_parallel_algo == "colossalai_cp"
    assert all(bool(r) == ring_expected for r in ring)


def test_plain_attention_and_unfused_norm_strategies():
    """The CPU path (plain attention, self-defined RMSNorm) gets strategies on its own primitives too."""
    from telechat_ms.config import TeleChatConfig
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.parallel.layout import ParallelDims
    from telechat_ms.parallel.strategies import apply_strategies, recorded_strategies, strategy_table

    cfg = TeleChatConfig.preset("tiny", n_layer=1, vocab_size=256)
    dims = ParallelDims(dp=2, mp=2, sp=True)
    table = strategy_table(cfg, dims, fused_norm=False)
    model = TeleChatForCausalLM(cfg)
    apply_strategies(model, table)
    rec = recorded_strategies(model)
    assert rec["model.layers.0.attention.qk_matmul"].inputs == ((2, 2, 1, 1), (2, 2, 1, 1))
    assert "model.layers.0.attention.tile_kv" not in rec   # grouped attention: the kv heads are never tiled
    assert rec["model.layers.0.attention.mask_add"].inputs == ((2, 2, 1, 1, 1), (2, 1, 1, 1, 1))
    assert rec["model.layers.0.attention_norm.mul2"].inputs == ((2, 2, 1), (1,))
    assert rec["model.layers.0.attention.wo.matmul"].outputs == ((4, 1),)
    assert {k: (v.inputs, v.outputs) for k, v in rec.items()} == {k: (v.inputs, v.outputs) for k, v in table.items()}
