"""Single-process emulation (numpy, float64) of the model-parallel cached step: every rank's shards are cut FROM
the declared predict strategies (parameter_splits of the table, the cache write's split), each rank computes its
part, and the collectives are emulated (all-reduce = sum, all-gather = concat). The kv-cache write emulates what
MindSpore's ScatterNdAdd does with a split indexed dimension (its replace graph: every rank receives the whole
update, takes indices modulo its slice and masks the rows of other ranks' heads). It has the stepper interface, so
a DecodeSession drives it exactly as it drives the real steppers."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from telechat_ms.parallel.predict import ModelParallelStepper, split_block
from telechat_ms.parallel.strategies import parameter_splits
from telechat_ms.positions import cache_inputs


def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


def silu(x):
    return x / (1 + np.exp(-x))


class ShardedEmulator:
    """The predict configuration of one model on `mp` emulated ranks, over static caches of batch x max_len."""

    def __init__(self, cfg, weights: dict[str, np.ndarray], table: dict, mp: int, batch: int, max_len: int,
                 kv_rows: str = "interleaved"):
        self.cfg, self.table, self.mp, self.batch, self.max_len = cfg, table, mp, batch, max_len
        self.splits = parameter_splits(list(weights), table)
        self.w = weights
        if kv_rows == "grouped":     # negative control: key_value rows as [all K; all V] (the layout the spec forbids)
            for name in [n for n in weights if n.endswith("attention.wk_v.weight")]:
                k, d = cfg.num_key_value_heads, cfg.head_dim
                self.w = dict(self.w)
                self.w[name] = weights[name].reshape(k, 2, d, -1).transpose(1, 0, 2, 3).reshape(2 * k * d, -1)
        self.shards = [{n: split_block(a, self.splits[n], r) for n, a in self.w.items()} for r in range(mp)]
        self.cache_split = tuple(table["model.layers.0.attention.cache_add"].inputs[0])
        k_local = cfg.num_key_value_heads // self.cache_split[1]
        shape = (batch, k_local, max_len, cfg.head_dim)
        self.caches = [[(np.zeros(shape), np.zeros(shape)) for _ in range(cfg.n_layer)] for _ in range(mp)]
        self.host = SimpleNamespace(batch=batch, max_len=max_len, scratch=max_len - 1,
                                    written=np.zeros((batch, max_len), bool))

    # ------------------------------------------------------------ collectives over the emulated ranks
    @staticmethod
    def all_reduce(parts):
        return sum(parts)

    @staticmethod
    def all_gather(parts, axis):
        return np.concatenate(parts, axis=axis)

    def _linear(self, x_full, name, rank):
        """A rank's output of x @ W.T with W cut as declared: column-parallel -> its output block; row-parallel ->
        a partial sum over its input block (the caller all-reduces)."""
        w = self.shards[rank][name]
        split = self.splits[name]
        if split[1] > 1:                       # input dimension split: this rank's slice of x's last axis
            n = w.shape[1]
            return x_full[..., rank * n:(rank + 1) * n] @ w.T
        return x_full @ w.T

    def _write(self, cache, update, index, rank):
        """ScatterNdAdd on a slice split along indexed dims: indices mod slice, rows of other ranks masked; the
        updates of the scratch slot (the cache's last) zeroed first, as the model's add path does."""
        update = update * (index[..., 2] != self.max_len - 1)[..., None]
        slice_shape = np.array(cache.shape[:3])
        coords = np.unravel_index(rank, self.cache_split)[:3]
        owner = np.all(index // slice_shape == np.array(coords), axis=-1)
        local = index % slice_shape
        np.add.at(cache, (local[..., 0], local[..., 1], local[..., 2]), update * owner[..., None])

    def step(self, ids, positions, totals, slots, first_slot, last) -> np.ndarray:
        cfg, eps, d = self.cfg, self.cfg.layer_norm_epsilon, self.cfg.head_dim
        ids, slots = np.asarray(ids), np.asarray(slots)
        b, n = ids.shape
        keep = ModelParallelStepper.stale_keep(self.host, slots)      # the stepper's own host bookkeeping
        if keep is not None:
            for rank in range(self.mp):
                self.caches[rank] = [(k * keep, v * keep) for k, v in self.caches[rank]]
        inp = cache_inputs(cfg, positions, totals, slots, first_slot, self.max_len)
        cos, sin = inp.cos.astype(np.float64), inp.sin.astype(np.float64)
        hide = inp.mask.astype(bool)                                   # [B, 1, n, L]
        # vocab-parallel embedding: each rank looks up the ids in its rows, the others contribute 0
        emb = "model.tok_embeddings.embedding_weight"
        if self.splits[emb][0] == 1:                                  # replicated (vocab_emb_dp)
            h = self.w[emb][ids]
        else:
            parts = []
            for rank in range(self.mp):
                rows = self.shards[rank][emb]
                lo = rank * rows.shape[0]
                own = (ids >= lo) & (ids < lo + rows.shape[0])
                parts.append(np.where(own[..., None], rows[np.clip(ids - lo, 0, rows.shape[0] - 1)], 0.0))
            h = self.all_reduce(parts)
        for i in range(cfg.n_layer):
            p = f"model.layers.{i}."
            a = rms(h, self.w[p + "attention_norm.weight"], eps)
            outs = []
            ks, vs, qs = [], [], []
            for rank in range(self.mp):
                q = self._linear(a, p + "attention.wq.weight", rank)
                kv = self._linear(a, p + "attention.wk_v.weight", rank)
                q = q.reshape(b, n, -1, d).transpose(0, 2, 1, 3)
                kv = kv.reshape(b, n, -1, 2 * d)
                k, v = kv[..., :d].transpose(0, 2, 1, 3), kv[..., d:].transpose(0, 2, 1, 3)
                qs.append(rope(q, cos, sin))
                ks.append(rope(k, cos, sin))
                vs.append(v)
            k_all, v_all = self.all_gather(ks, 1), self.all_gather(vs, 1)   # the write's replicated updates
            for rank in range(self.mp):
                kc, vc = self.caches[rank][i]
                self._write(kc, k_all, inp.index, rank)
                self._write(vc, v_all, inp.index, rank)
                q = qs[rank]                                           # [B, N/mp, n, d]
                k_local = kc.shape[1]
                rep = q.shape[1] // k_local
                qg = q.reshape(b, k_local, rep, n, d)
                scores = np.einsum("bgrnd,bgld->bgrnl", qg, kc) / np.sqrt(d)
                scores = scores - 1e9 * hide[:, :, None]                # the model's additive mask (pads too)
                probs = np.exp(scores - scores.max(-1, keepdims=True))
                probs /= probs.sum(-1, keepdims=True)
                o = np.einsum("bgrnl,bgld->bgrnd", probs, vc).reshape(b, -1, n, d)
                o = o.transpose(0, 2, 1, 3).reshape(b, n, -1)          # this rank's heads
                w = self.shards[rank][p + "attention.wo.weight"]
                outs.append(o @ w.T)                                   # row-parallel: partial sums
            h = h + self.all_reduce(outs) + self.w[p + "attention.wo.bias"]
            m = rms(h, self.w[p + "ffn_norm.weight"], eps)
            outs = []
            for rank in range(self.mp):
                g = silu(self._linear(m, p + "feed_forward.w1.weight", rank)) * \
                    self._linear(m, p + "feed_forward.w3.weight", rank)
                outs.append(g @ self.shards[rank][p + "feed_forward.w2.weight"].T)
            h = h + self.all_reduce(outs) + self.w[p + "feed_forward.w2.bias"]
        h = rms(h, self.w["model.norm_out.weight"], eps)[:, last]
        if self.splits["lm_head.weight"][0] == 1:
            logits = h @ self.w["lm_head.weight"].T
        else:                                                          # vocab shards, gathered for sampling
            logits = self.all_gather([self._linear(h, "lm_head.weight", r) for r in range(self.mp)], -1)
        self.host.written[np.arange(b)[:, None], slots] = True
        self.host.written[:, self.host.scratch] = False
        return logits
