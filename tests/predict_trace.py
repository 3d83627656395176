"""Trace the primitives a cached step really calls (PyNative, every Primitive class hooked) with their inputs, and
check each one against its shard strategy: present (unless its type takes its layout from its producer), one
entry per tensor input, each entry as long as that input's rank and dividing its shape.

FlashAttentionScore, RmsNorm, ReshapeAndCache and PagedAttention have no CPU kernels: inside a trace their calls
are recorded and their outputs computed in numpy with the function their documentation gives, so the Ascend
configuration's steps can be traced on CPU too."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore.ops.primitive import Primitive

# Types that carry no strategy by design: layout plumbing (MindSpore redistributes around them) and metadata.
EXEMPT = {
    "Reshape": "a view: MindSpore derives its layout and inserts any redistribution",
    "Cast": "one input, element-wise, one instance used at several ranks: follows its producer's layout",
    "Shape": "metadata", "DType": "metadata", "DtypeToEnum": "metadata", "ProxyOp": "metadata",
    "Depend": "control: orders the paged kernels' cache write before their read",
}


@dataclass
class Call:
    prim: Primitive
    kind: str
    inputs: list          # per strategy entry: a shape tuple, or None for a Python scalar


def _inputs(args) -> list:
    out = []
    for a in args:
        if isinstance(a, (tuple, list)) and a and all(isinstance(x, ms.Tensor) for x in a):
            out += [tuple(x.shape) for x in a]
        elif isinstance(a, ms.Tensor):
            out.append(tuple(a.shape))
        elif isinstance(a, float):
            out.append(None)
    return out


def _flash(prim, q, k, v, *rest):
    """FlashAttentionScore (BNSD, sparse_mode 0): softmax(q k^T x scale, masked) v; 4 outputs, the last used."""
    mask = rest[3]
    qn, kn, vn = (np.asarray(t.asnumpy(), np.float64) for t in (q, k, v))
    scores = qn @ np.swapaxes(kn, -1, -2) * prim.scale_value - 1e9 * mask.asnumpy()
    p = np.exp(scores - scores.max(-1, keepdims=True))
    out = ms.Tensor((p / p.sum(-1, keepdims=True)) @ vn, q.dtype)
    return None, None, None, out


def _rms_norm(prim, x, w):
    xn = np.asarray(x.asnumpy(), np.float64)
    y = xn / np.sqrt((xn * xn).mean(-1, keepdims=True) + prim.epsilon) * w.asnumpy()
    return ms.Tensor(y, x.dtype), None


def _reshape_and_cache(prim, key, value, key_cache, value_cache, slot_mapping):
    """ReshapeAndCache as documented: token t's key / value [K * d] into slot slot_mapping[t] of the block-major
    caches [num_blocks, block_size, K, d] (in place)."""
    slots = slot_mapping.asnumpy().reshape(-1)
    for new, cache in ((key, key_cache), (value, value_cache)):
        data = cache.asnumpy().copy()
        nb, bs = data.shape[:2]
        flat = data.reshape(nb * bs, -1)
        flat[slots] = new.asnumpy().reshape(len(slots), -1)
        cache.set_data(ms.Tensor(flat.reshape(data.shape), cache.dtype))
    return key


def _paged_attention(prim, query, key_cache, value_cache, block_tables, context_lens, *rest):
    """PagedAttention as documented: each row's query [1, N * d] over the first context_lens[r] tokens of its blocks
    (block_tables[r]), query head h reading kv head h // (N / K), softmax(q k^T x scale) v; [R, 1, N * d]."""
    q = np.asarray(query.asnumpy(), np.float64)
    kc, vc = (np.asarray(c.asnumpy(), np.float64) for c in (key_cache, value_cache))
    nb, bs, n_kv, d = kc.shape
    heads = prim.head_num
    out = np.zeros_like(q)
    for r, (table, length) in enumerate(zip(block_tables.asnumpy(), context_lens.asnumpy())):
        idx = np.arange(int(length))
        slots = table[idx // bs] * bs + idx % bs
        k, v = kc.reshape(nb * bs, n_kv, d)[slots], vc.reshape(nb * bs, n_kv, d)[slots]    # [L, K, d]
        qr = q[r].reshape(heads, d)
        kv_of = np.arange(heads) // (heads // n_kv)
        scores = np.einsum("hd,lhd->hl", qr, k[:, kv_of]) * prim.scale_value
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[r] = np.einsum("hl,lhd->hd", p, v[:, kv_of]).reshape(1, -1)
    return ms.Tensor(out, query.dtype)


SHIMS = {"FlashAttentionScore": _flash, "RmsNorm": _rms_norm, "ReshapeAndCache": _reshape_and_cache,
         "PagedAttention": _paged_attention}


def _classes() -> set:
    seen, todo = {Primitive}, [Primitive]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                todo.append(sub)
    return {c for c in seen if "__call__" in c.__dict__}


@contextlib.contextmanager
def trace():
    """Yield a list that collects a Call for every primitive call (PyNative)."""
    calls: list[Call] = []
    saved = {}

    def hook(cls, original):
        def call(self, *args, **kwargs):
            kind = type(self).__name__
            calls.append(Call(self, kind, _inputs(args)))
            if kind in SHIMS:
                return SHIMS[kind](self, *args)
            return original(self, *args, **kwargs)
        return call

    for cls in _classes():
        saved[cls] = cls.__dict__["__call__"]
        setattr(cls, "__call__", hook(cls, saved[cls]))
    try:
        yield calls
    finally:
        for cls, original in saved.items():
            setattr(cls, "__call__", original)


def strategy_problems(calls: list[Call]) -> list[str]:
    """Every call whose primitive has no strategy (and is not EXEMPT) or whose strategy does not fit its inputs."""
    problems = []
    for c in calls:
        strategy = c.prim.attrs.get("in_strategy")
        if strategy is None:
            if c.kind not in EXEMPT:
                problems.append(f"{c.kind} ({c.prim.name}) inputs {c.inputs}: no strategy")
            continue
        strategy = [tuple(s) for s in strategy]
        if len(strategy) != len(c.inputs):
            problems.append(f"{c.kind}: {len(strategy)} strategy entries for {len(c.inputs)} inputs {c.inputs}")
            continue
        for s, shape in zip(strategy, c.inputs):
            if shape is None:
                if s != ():
                    problems.append(f"{c.kind}: a scalar input needs (), got {s}")
            elif len(s) != len(shape) or any(n % k for n, k in zip(shape, s)):
                problems.append(f"{c.kind}: strategy {s} does not cut an input of shape {shape}")
    return problems
