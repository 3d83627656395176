"""Per-NPU memory and per-step FLOPs of a parallel layout, with every formula written out (and printed by plan).

Symbols: b micro-batch size, s sequence length, h hidden, f ffn, kd = kv heads x head_dim, V vocab, t = mp,
c = cp, a = bytes of the compute dtype. X = b*s*h/c, Xk = b*s*kd/c, Xf = b*s*f/c are elements per device
before the mp split. Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation"),
re-derived for this layer (pre-norm RMSNorm, fused GQA key_value, SwiGLU MLP, no dropout):

  stored per layer and micro batch (elements; x a bytes):
    norm inputs         2X / (t if sp else 1)
    matmul inputs       2X  (the norm outputs that feed wq/wk_v and w1/w3; 0 with sp + comm recompute)
    q, k, v after rope  (X + 2Xk) / t
    attention core      FA: output X/t;  plain: softmax b*n*s^2/(c*t) in fp32 + probs in a bytes
                        (+ repeated k, v 2X/t when n_rep > 1); selective recompute drops the plain scores
    wo input            X / t
    MLP                 w1 and w3 outputs 2Xf/t; silu and mul outputs 2Xf/t (dropped by selective recompute)
  full recompute keeps only the layer input: X/t with sp (or recompute_slice_activation), else X.
  in flight on stage p with 1F1B: min(pp - p, micro_batch_num) micro batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from telechat_ms.config import TeleChatConfig
from telechat_ms.parallel.layout import ParallelDims, StageLayout

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
FORMULAS = [
    "weights    = 4 B x params / (replicas if parallel optimizer)       [fp32 master weights]",
    "gradients  = 4 B x params / (replicas if parallel optimizer)  [one step's; 0 with pipeline stages, which add",
    "              each gradient into its buffer as it is produced]",
    "grad_buffers = 4 B x params / (replicas if parallel optimizer)  [fp32 accumulation buffers: only with",
    "              micro-batch / step accumulation (pipeline stages or gradient_accumulation_steps > 1)]",
    "optimizer  = 8 B x params / (replicas if parallel optimizer)       [AdamW m, v in fp32]",
    "copies     = a x params of layers not fully recomputed (+ lm_head)  [compute-dtype casts kept for backward]",
    "activations= in-flight x sum over the stage's layers of act/layer; in-flight = min(pp - stage, micro batches)",
    "act/layer  = a x [2X/(t if sp) + (0 if sp and comm recompute, else 2X) + (X + 2Xk)/t + X/t (attention out)",
    "              + X/t (wo input) + (2 if selective else 4) x Xf/t]  (+ fp32 scores without flash attention);",
    "              full recompute: a x X/t (sp or sliced) or a x X;  X = b*s*h/c, Xk = b*s*kd/c, Xf = b*s*f/c",
    "working    = one layer's activations without recompute, for one micro batch (backward working set)",
    "logits     = (a + 8) B x b*s*V/(c*t) on the last stage             [logits, fp32 logits, log-softmax]",
    "replicas   = dp*cp for mp-split weights (dp for the vocab-parallel embedding)",
    "pool       = sum of the above, compared to context.max_device_memory (GiB)",
]
PREDICT_FORMULAS = [
    "weights    = w x (layers x (matrix params / mp + norms, biases) + 2 x V x h / mp + h)   [w = param-dtype bytes]",
    "kv_cache   = a x 2 x layers x b x L x K x d / mp   [keys and values of b rows x L slots, split by whole kv heads]",
    "working    = a x b x L x (4h + (h + 2Kd)/mp + 3f/mp)  [one layer of a prefill filling the cache]",
    "             + flash attention: a x 2 x b x L x n x d / mp (kv heads repeated to the query heads, n_rep > 1);",
    "             plain attention: (4 + a) x b x (n/mp) x L x L (fp32 scores and probabilities)",
    "logits     = 4 B x b x V   [fp32 logits of each row's last token, gathered from the vocab shards]",
]
# Published single-request decode speed of the MindSpore port on Atlas 800T A2 (spec section 7), tokens/s.
PUBLISHED_DECODE_TOKENS_S = {"7b": 54.1, "35b": 27.7, "115b": 26.5, "39b_a12b": 36.4}
# Published fine-tuning throughput (tokens/s per NPU, seq 8192; spec 7 and 12).
PUBLISHED_FINETUNE_TOKENS_S = {"7b": 2950, "35b": 516, "115b": 158, "39b_a12b": 865}
# Default HBM bandwidth of one Atlas 800T A2 NPU (Ascend 910B), GB/s: derived, not a Huawei-published figure:
# 64 GB of HBM2e as 4 stacks of 16 GB, each 1024 bits wide at JEDEC HBM2E's 3.2 Gb/s per pin (409.6 GB/s).
HBM_GBS_ATLAS_800T_A2 = 4 * 1024 * 3.2 / 8


@dataclass
class MemoryInputs:
    """What the estimate needs beyond the model config and degrees."""

    seq: int
    micro_batch_size: int = 1
    compute_dtype: str = "bfloat16"
    parallel_optimizer: bool = False
    accumulate: bool = False                 # gradients accumulated over micro batches or steps
    full: set[int] = field(default_factory=set)
    select: set[int] = field(default_factory=set)
    comm: set[int] = field(default_factory=set)
    slice_activation: bool = False


@dataclass
class StageMemory:
    """Bytes per NPU on one pipeline stage, by component."""

    stage: int
    layers: int
    in_flight: int
    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def layer_params(cfg: TeleChatConfig) -> tuple[int, int]:
    """(matrix parameters split by mp, small replicated parameters: norms and biases) of one layer; an MoE layer's
    experts are apart (expert_params), its router and expert biases count as small."""
    h, f, kd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_key_value_heads * cfg.head_dim
    if cfg.is_moe:
        return 2 * h * h + 2 * kd * h, 3 * h + 2 * cfg.num_experts * h
    return 2 * h * h + 2 * kd * h + 3 * h * f, 4 * h


def expert_params(cfg: TeleChatConfig, active: bool = False) -> int:
    """Expert matrices of one MoE layer (split by expert_parallel x mp); `active`: those one token runs."""
    if not cfg.is_moe:
        return 0
    return (cfg.num_experts_per_tok if active else cfg.num_experts) * 3 * cfg.hidden_size * cfg.ffn_hidden_size


def routed_slots(cfg: TeleChatConfig) -> float:
    """Expert slots per token of a training forward: k x capacity_factor, or every expert's slot (E) when
    nothing is dropped (capacity_factor 0)."""
    if not cfg.is_moe:
        return 1.0
    return cfg.num_experts_per_tok * cfg.capacity_factor if cfg.capacity_factor > 0 else float(cfg.num_experts)


def layer_activation_elems(cfg: TeleChatConfig, dims: ParallelDims, inp: MemoryInputs, *, full: bool = False,
                           select: bool = False, comm: bool = False) -> float:
    """Activation bytes one layer keeps for backward, per micro batch and device (see module doc)."""
    a = DTYPE_BYTES[inp.compute_dtype]
    b, s, t, c = inp.micro_batch_size, inp.seq, dims.mp, dims.cp
    x = b * s * cfg.hidden_size / c
    xk = b * s * cfg.num_key_value_heads * cfg.head_dim / c
    xf = b * s * cfg.ffn_hidden_size * routed_slots(cfg) / c   # MoE: the routed tokens' expert activations
    if full:
        return a * (x / t if (dims.sp or inp.slice_activation) else x)
    elems = 2 * x / (t if dims.sp else 1)                    # norm inputs
    elems += 0 if (dims.sp and comm) else 2 * x              # gathered / replicated matmul inputs
    elems += (x + 2 * xk) / t                                # q, k, v after rope
    extra_bytes = 0.0
    if cfg.use_flash_attention:
        elems += x / t                                       # flash-attention output
    elif not select:
        scores = b * cfg.n_head * s * s / (c * t)
        extra_bytes = scores * (4 + a)                       # fp32 softmax output + probs in compute dtype
        if cfg.n_rep > 1:
            elems += 2 * x / t                               # repeated k, v
    elems += x / t                                           # wo input
    elems += 2 * xf / t if select else 4 * xf / t            # w1, w3 outputs (+ silu, mul outputs)
    if cfg.is_moe:                                           # dispatched inputs, expert outputs, routing
        elems += 2 * x * routed_slots(cfg)
        extra_bytes += 4 * 2 * b * s * cfg.num_experts_per_tok * cfg.num_experts / c
    return a * elems + extra_bytes


def in_flight(stage: int, dims: ParallelDims) -> int:
    """Micro batches whose activations stage `stage` holds at its peak under 1F1B."""
    return min(dims.pp - stage, dims.micro) if dims.pp > 1 else 1


def interleaved_in_flight_layers(stage: int, layers: int, dims: ParallelDims) -> float:
    """Layer-micro-batches held under Megatron's interleaved 1F1B (Narayanan et al. 2021), for comparison."""
    if dims.pp == 1 or dims.interleave == 1:
        return in_flight(stage, dims) * layers
    v = dims.interleave
    chunks = min(2 * (dims.pp - stage - 1) + (v - 1) * dims.pp + 1, dims.micro * v)
    return chunks * layers / v


def stage_memory(cfg: TeleChatConfig, dims: ParallelDims, layout: StageLayout, inp: MemoryInputs,
                 megatron_interleave: bool = False) -> list[StageMemory]:
    """Estimated bytes per NPU for every pipeline stage."""
    a = DTYPE_BYTES[inp.compute_dtype]
    lp_mp, lp_small = layer_params(cfg)
    h, v = cfg.hidden_size, cfg.vocab_size
    vocab_split = 1 if dims.vocab_emb_dp or v % (dims.mp * dims.cp) else dims.mp * dims.cp
    head_split = 1 if dims.vocab_emb_dp or v % dims.mp else dims.mp
    out = []
    for st in range(dims.pp):
        ids = layout.layers_on(st)
        # (parameters per device, replicas the parallel optimizer can shard them over)
        groups = [(len(ids) * lp_mp / dims.mp, dims.dp * dims.cp), (len(ids) * lp_small, 1)]
        copies = sum(lp_mp / dims.mp for i in ids if i not in inp.full)
        if cfg.is_moe:  # experts split over ep x mp; the parallel optimizer shards them over the other dp ranks
            ex = expert_params(cfg) / (dims.ep * dims.mp)
            groups.append((len(ids) * ex, dims.dp * dims.cp // dims.ep))
            copies += sum(ex for i in ids if i not in inp.full)
        if st == 0:
            groups.append((v * h / vocab_split, dims.dp * dims.cp * dims.mp // vocab_split))
        if st == dims.pp - 1:
            groups.append((v * h / head_split, dims.dp * dims.cp * dims.mp // head_split))
            groups.append((h, 1))
            copies += v * h / head_split
        po = inp.parallel_optimizer
        weights = sum(4 * n / (r if po else 1) for n, r in groups)
        grads = 0.0 if inp.accumulate and dims.pp > 1 else sum(4 * n / (r if po else 1) for n, r in groups)
        optim = sum(8 * n / (r if po else 1) for n, r in groups)
        copy_bytes = a * copies if inp.compute_dtype != cfg.param_dtype else 0.0
        per_layer = [layer_activation_elems(cfg, dims, inp, full=i in inp.full, select=i in inp.select,
                                            comm=i in inp.comm) for i in ids]
        mb = in_flight(st, dims)
        if megatron_interleave and ids:
            acts = interleaved_in_flight_layers(st, len(ids), dims) * sum(per_layer) / len(ids)
        else:
            acts = mb * sum(per_layer)
        working = layer_activation_elems(cfg, dims, inp)
        logits = 0.0
        if st == dims.pp - 1:
            rows = inp.micro_batch_size * inp.seq / dims.cp
            logits = (a * v / head_split + 8 * v / dims.mp) * rows
        parts = {"weights": weights, "gradients": grads}
        if inp.accumulate:  # the fused step without accumulation keeps no buffers (telechat_ms.train.step)
            parts["grad_buffers"] = sum(4 * n / (r if po else 1) for n, r in groups)
        parts.update({"optimizer": optim, "copies": copy_bytes, "activations": acts, "working": working,
                      "logits": logits})
        out.append(StageMemory(stage=st, layers=len(ids), in_flight=mb, parts=parts))
    return out


def predict_memory(cfg: TeleChatConfig, dims: ParallelDims, batch: int, seq: int) -> StageMemory:
    """Inference on one stage: weights in param dtype split by mp, kv cache for batch x seq, prefill working set."""
    w = DTYPE_BYTES[cfg.param_dtype]
    a = DTYPE_BYTES[cfg.compute_dtype]
    mp, d, n = dims.mp, cfg.head_dim, cfg.n_head
    lp_mp, lp_small = layer_params(cfg)
    vh = cfg.vocab_size * cfg.hidden_size
    vocab_split = 1 if dims.vocab_emb_dp or cfg.vocab_size % mp else mp
    weights = w * (cfg.n_layer * ((lp_mp + expert_params(cfg)) / mp + lp_small) + 2 * vh / vocab_split
                   + cfg.hidden_size)
    kv = kv_bytes_per_token(cfg, dims) * batch * seq
    kd = cfg.num_key_value_heads * d
    ffn = 3 * cfg.ffn_hidden_size / mp * (cfg.num_experts if cfg.is_moe else 1)  # MoE prefill: a slot per expert
    working = a * batch * seq * (4 * cfg.hidden_size + (cfg.hidden_size + 2 * kd) / mp + ffn)
    if cfg.use_flash_attention:
        working += a * 2 * batch * seq * n * d / mp if cfg.n_rep > 1 else 0.0
    else:
        working += (4 + a) * batch * (n / mp) * seq * seq
    logits = 4.0 * batch * cfg.vocab_size
    return StageMemory(stage=0, layers=cfg.n_layer, in_flight=1,
                       parts={"weights": weights, "kv_cache": kv, "working": working, "logits": logits})


def kv_bytes_per_token(cfg: TeleChatConfig, dims: ParallelDims) -> float:
    """kv-cache bytes one token of one row takes on each NPU (keys and values of every layer, 1/mp of the heads)."""
    return DTYPE_BYTES[cfg.compute_dtype] * 2 * cfg.n_layer * cfg.num_key_value_heads * cfg.head_dim / dims.mp


def largest_fitting(total, limit_bytes: float, upper: int) -> int:
    """Largest x in [0, upper] with total(x) <= limit_bytes, for a total() that grows with x (binary search)."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(mid) <= limit_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def released_size(cfg: TeleChatConfig) -> str | None:
    """'3b' / '7b' / '35b' / '115b' when the config has a released model's shape, else None."""
    keys = ("n_layer", "hidden_size", "ffn_hidden_size", "n_head", "num_key_value_heads", "vocab_size",
            "num_experts", "num_experts_per_tok")
    for name in ("3b", "7b", "35b", "115b", "telechat2_39b_a12b"):
        ref = TeleChatConfig.preset(name)
        if all(getattr(ref, k) == getattr(cfg, k) for k in keys):
            return name.removeprefix("telechat2_")
    return None


@dataclass
class DecodeEstimate:
    """Memory-bound decode speed: every step reads the weights and the whole static kv cache once."""

    bytes_per_step: float
    bandwidth_gbs: float
    batch: int

    @property
    def step_seconds(self) -> float:
        return self.bytes_per_step / (self.bandwidth_gbs * 1e9)

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second of one request (each row gets one token per step)."""
        return 1.0 / self.step_seconds


@dataclass
class Flops:
    """Training FLOPs per token and per step (model FLOPs: recompute not counted, as MFU is defined)."""

    per_token: float
    per_step: float
    tokens_per_step: int
    recompute_per_token: float


def training_flops(cfg: TeleChatConfig, seq: int, tokens_per_step: int, full_fraction: float) -> Flops:
    """6 x matmul params (+ lm_head) + 6 x layers x s x h for causal attention (scores and values, half masked).

    Forward per token: 2 FLOPs per matmul parameter; attention QK^T and PV cost 2 x 2 x s x h per layer for full
    attention, half with a causal mask. Backward = 2 x forward. Full recompute repeats the forward of the
    recomputed layers (reported separately: it costs time but is not model FLOPs).
    """
    lp_mp, _ = layer_params(cfg)
    active = lp_mp + expert_params(cfg, active=True) + cfg.num_experts * cfg.hidden_size  # MoE: k experts + router
    matmul = cfg.n_layer * active + cfg.vocab_size * cfg.hidden_size
    attn = 2 * cfg.n_layer * seq * cfg.hidden_size
    fwd = 2 * matmul + attn
    recompute = full_fraction * (2 * cfg.n_layer * active + attn)
    return Flops(per_token=3 * fwd, per_step=3 * fwd * tokens_per_step, tokens_per_step=tokens_per_step,
                 recompute_per_token=recompute)
