"""The MoE FFN's intended strategies, written by hand for the strategy-table tests (dense tests extend their
hand-written tables with these for MoE YAMLs): tr = routing groups (token shards), dm = data shards per ep rank."""
from __future__ import annotations


def moe_intended(ep: int, mp: int, tr: int, dm: int) -> dict:
    """Primitive path relative to the layer -> in_strategy."""
    g1, g2, g3, g4 = (tr, 1), (tr, 1), (tr, 1, 1), (tr, 1, 1, 1)
    t = {
        "router.dense.matmul": (g1, (1, 1)), "softmax": (g1,), "topk": (g1,), "gate_sum": (g1,),
        "gate_div": (g1, g1), "transpose_idx": (g3,), "onehot": (g3, (), ()), "cumsum": (g3,),
        "pos_mul": (g3, g3), "pos_sum": (g3,), "less_equal": (g2, ()), "slot_mul": (g2, ()), "slot_add": (g2, g2),
        "keep_select": (g2, g2, g2), "slot_off": (g2, g2), "scatter": ((1, 1), (1,)), "concat_x": (g3, g3),
        "gather_in": (g3, g2), "transpose_in": (g4,),
        "ffn.w1.matmul": ((ep, dm, 1), (ep, mp, 1)), "ffn.w3.matmul": ((ep, dm, 1), (ep, mp, 1)),
        "ffn.silu.silu": ((ep, dm, mp),), "ffn.mul": ((ep, dm, mp), (ep, dm, mp)),
        "ffn.w2.matmul": ((ep, dm, mp), (ep, 1, mp)), "ffn.w2.bias_add": ((1, ep, dm, 1), (1, ep, 1, 1)),
        "transpose_back": ((ep, dm, 1, 1),), "concat_out": (g3, g3), "transpose_slot": (g3,),
        "gather_out": (g3, g2), "coeff_mul": (g4, g4), "combine_sum": (g4,), "mean_probs": (g3,),
        "mean_load": (g3,), "aux_mul": (g2, g2), "aux_sum": (g2,), "aux_scale": ((), ()), "count_sum": (g3,),
        "kept_sum": (g2,),
    }
    return {f"feed_forward.{k}": v for k, v in t.items()}
