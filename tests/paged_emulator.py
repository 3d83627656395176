"""Single-process emulation (numpy, float64) of the model-parallel PAGED step: every rank's weight shards and its
slice of the paged caches [num_blocks * block_size, K / mp, d] are cut FROM the declared paged predict strategies
(strategies.paged_predict_strategy_table: parameter splits, the paged write's split), each rank computes its part,
collectives are emulated (all-reduce = sum, all-gather = concat). The paged write is a ScatterUpdate whose split
dimension (kv heads) is not indexed: every rank writes its own heads of each new slot. It has the paged stepper
interface (step / step_columns), so a PagedEngine drives it, or recorded calls are replayed on it."""
from __future__ import annotations

import numpy as np

from telechat_ms.parallel.predict import split_block
from telechat_ms.parallel.strategies import parameter_splits
from telechat_ms.positions import paged_inputs
from tests.predict_emulator import rms, rope, silu


class PagedShardedEmulator:
    """The paged predict configuration of one model on `mp` emulated ranks, over num_blocks x block_size slots."""

    def __init__(self, cfg, weights: dict[str, np.ndarray], table: dict, mp: int, num_blocks: int, block_size: int):
        self.cfg, self.mp, self.num_blocks, self.block_size = cfg, mp, num_blocks, block_size
        self.splits = parameter_splits(list(weights), table)
        self.w = weights
        self.shards = [{n: split_block(a, self.splits[n], r) for n, a in weights.items()} for r in range(mp)]
        self.cache_split = tuple(table["model.layers.0.attention.paged_write_k"].inputs[0])
        shape = (num_blocks * block_size, cfg.num_key_value_heads // self.cache_split[1], cfg.head_dim)
        self.caches = [[(np.zeros(shape), np.zeros(shape)) for _ in range(cfg.n_layer)] for _ in range(mp)]
        self.shapes: set = set()

    def _linear(self, x, name, rank):
        w = self.shards[rank][name]
        if self.splits[name][1] > 1:               # row-parallel: this rank's input block, a partial sum
            n = w.shape[1]
            return x[..., rank * n:(rank + 1) * n] @ w.T
        return x @ w.T

    def step(self, ids, positions, totals, slots, block_tables, last) -> np.ndarray:
        return self._forward(ids, positions, totals, slots, block_tables)[:, last]

    def step_columns(self, ids, positions, totals, slots, block_tables) -> np.ndarray:
        return self._forward(ids, positions, totals, slots, block_tables)

    def _forward(self, ids, positions, totals, slots, block_tables) -> np.ndarray:
        cfg, eps, d, bs = self.cfg, self.cfg.layer_norm_epsilon, self.cfg.head_dim, self.block_size
        ids, slots, tables = np.asarray(ids), np.asarray(slots).reshape(-1), np.asarray(block_tables)
        r, n = ids.shape
        ctx = (tables[:, :, None] * bs + np.arange(bs)).reshape(r, -1)             # [R, C] slots of each row
        inp = paged_inputs(cfg, positions, totals, ctx.shape[1])
        cos, sin = inp.cos.astype(np.float64), inp.sin.astype(np.float64)          # [R, n, 1, d]
        hide = inp.mask.astype(bool)                                               # [R, 1, n, C]
        emb = "model.tok_embeddings.embedding_weight"
        if self.splits[emb][0] == 1:
            h = self.w[emb][ids]
        else:                                      # vocab-parallel lookup, summed over ranks
            parts = []
            for rank in range(self.mp):
                rows = self.shards[rank][emb]
                lo = rank * rows.shape[0]
                own = (ids >= lo) & (ids < lo + rows.shape[0])
                parts.append(np.where(own[..., None], rows[np.clip(ids - lo, 0, rows.shape[0] - 1)], 0.0))
            h = sum(parts)
        for i in range(cfg.n_layer):
            p = f"model.layers.{i}."
            a = rms(h, self.w[p + "attention_norm.weight"], eps)
            outs = []
            for rank in range(self.mp):
                q = self._linear(a, p + "attention.wq.weight", rank).reshape(r, n, -1, d)
                kv = self._linear(a, p + "attention.wk_v.weight", rank).reshape(r, n, -1, 2 * d)
                q = rope(q, cos, sin).transpose(0, 2, 1, 3)                          # [R, N/mp, n, d]
                k, v = rope(kv[..., :d], cos, sin), kv[..., d:]                      # [R, n, K/mp, d]
                kc, vc = self.caches[rank][i]
                kc[slots] = k.reshape(r * n, -1, d)                                  # this rank's heads of each slot
                vc[slots] = v.reshape(r * n, -1, d)
                ck, cv = kc[ctx].transpose(0, 2, 1, 3), vc[ctx].transpose(0, 2, 1, 3)  # [R, K/mp, C, d]
                k_local = ck.shape[1]
                qg = q.reshape(r, k_local, -1, n, d)
                scores = np.einsum("bgrnd,bgld->bgrnl", qg, ck) / np.sqrt(d)
                scores = scores - 1e9 * hide[:, :, None]
                probs = np.exp(scores - scores.max(-1, keepdims=True))
                probs /= probs.sum(-1, keepdims=True)
                o = np.einsum("bgrnl,bgld->bgrnd", probs, cv).reshape(r, -1, n, d)
                o = o.transpose(0, 2, 1, 3).reshape(r, n, -1)
                outs.append(o @ self.shards[rank][p + "attention.wo.weight"].T)     # row-parallel partial sums
            h = h + sum(outs) + self.w[p + "attention.wo.bias"]
            m = rms(h, self.w[p + "ffn_norm.weight"], eps)
            outs = []
            for rank in range(self.mp):
                g = silu(self._linear(m, p + "feed_forward.w1.weight", rank)) * \
                    self._linear(m, p + "feed_forward.w3.weight", rank)
                outs.append(g @ self.shards[rank][p + "feed_forward.w2.weight"].T)
            h = h + sum(outs) + self.w[p + "feed_forward.w2.bias"]
        h = rms(h, self.w["model.norm_out.weight"], eps)
        if self.splits["lm_head.weight"][0] == 1:
            return h @ self.w["lm_head.weight"].T
        return np.concatenate([self._linear(h, "lm_head.weight", rk) for rk in range(self.mp)], -1)
