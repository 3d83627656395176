"""The parallel layout of a job: degrees (dp, mp, pp, cp, sp), pipeline stage of every layer, and the checks
that a layout fits the model. Pure Python (no MindSpore import), shared by `parallelize` and `telechat-ms plan`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from telechat_ms.config import TeleChatConfig
from telechat_ms.errors import ConfigError
from telechat_ms.job_config import ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of parallelism, named as in MindFormers' parallel_config."""

    dp: int = 1
    mp: int = 1
    pp: int = 1
    cp: int = 1
    cp_ulysses: int = 1          # part of cp done Ulysses-style (heads all-to-all); the rest is ring attention
    sp: bool = False             # sequence-parallel norms, residual adds and reduce-scatter after row-parallel matmuls
    micro: int = 1               # pipeline micro batches
    interleave: int = 1          # virtual pipeline chunks per stage
    vocab_emb_dp: bool = False   # embedding (and lm_head) replicated instead of vocab-parallel
    ep: int = 1                  # MoE expert parallel: experts split over ep of the dp ranks (MindFormers' meaning)

    @property
    def world(self) -> int:
        return self.dp * self.mp * self.pp * self.cp

    @property
    def cp_ring(self) -> int:
        """Sequence chunks exchanged by ring attention (colossalai_cp part of cp)."""
        return self.cp // self.cp_ulysses

    @property
    def head_split(self) -> int:
        """Ways the attention heads are split inside attention (mp, times the Ulysses degree)."""
        return self.mp * self.cp_ulysses

    @classmethod
    def from_config(cls, pc: ParallelConfig) -> "ParallelDims":
        """Read a job's parallel_config section."""
        algo = pc.context_parallel_algo
        if pc.context_parallel == 1 or algo == "colossalai_cp":
            ulysses = 1
        elif algo == "ulysses_cp":
            ulysses = pc.context_parallel
        else:  # hybrid_cp
            ulysses = pc.ulysses_degree_in_cp
        return cls(dp=pc.data_parallel, mp=pc.model_parallel, pp=pc.pipeline_stage, cp=pc.context_parallel,
                   cp_ulysses=ulysses, sp=bool(pc.use_seq_parallel), micro=pc.micro_batch_num,
                   interleave=pc.pp_interleave_num, vocab_emb_dp=bool(pc.vocab_emb_dp), ep=pc.expert_parallel)


@dataclass
class Issue:
    """One finding of a layout check: level 'error' (the job cannot run) or 'warning'."""

    level: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.field}: {self.message}"


@dataclass
class StageLayout:
    """Where each decoder layer runs: its pipeline stage and virtual chunk (interleave)."""

    stage_of: list[int]
    chunk_of: list[int]
    layers_per_chunk: list[list[int]] = field(default_factory=list)  # [chunk][stage] -> number of layers

    def layers_on(self, stage: int) -> list[int]:
        return [i for i, s in enumerate(self.stage_of) if s == stage]


def _offset_matrix(offset, pp: int, interleave: int, where: str) -> list[list[int]]:
    """Broadcast a pipeline offset (0, [pp ints] or [interleave x [pp ints]]) to interleave x pp."""
    if offset in (None, [], 0):
        return [[0] * pp for _ in range(interleave)]
    if isinstance(offset, int):
        raise ConfigError(f"{where}: a non-zero scalar offset {offset} is ambiguous; give one value per stage")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in offset):
        if len(offset) != pp:
            raise ConfigError(f"{where}: {len(offset)} offsets for {pp} pipeline stages ({offset})")
        return [list(offset) for _ in range(interleave)]
    if all(isinstance(row, list) for row in offset):
        if len(offset) != interleave or any(len(row) != pp for row in offset):
            raise ConfigError(f"{where}: expected {interleave} rows (pp_interleave_num) of {pp} offsets, got {offset}")
        return [list(row) for row in offset]
    raise ConfigError(f"{where}: offsets must be integers or lists of integers, got {offset!r}")


def stage_layout(n_layer: int, pp: int, interleave: int = 1, offset=None,
                 where: str = "model.pipeline_offset") -> StageLayout:
    """Layers per stage as MindFormers' LayerSetting does it: n_layer // (pp * interleave) each, plus offset.

    Chunk c of stage s holds `base + offset[c][s]` consecutive layers; chunks are laid out chunk-major
    (chunk 0 of stages 0..pp-1, then chunk 1 ...). Offsets must sum to the remainder of the division.
    """
    total = pp * interleave
    if n_layer < total:
        raise ConfigError(f"{where}: {n_layer} layers cannot fill {pp} stages x {interleave} chunks")
    base, remainder = divmod(n_layer, total)
    rows = _offset_matrix(offset, pp, interleave, where)
    if total == 1:
        rows = [[0]]
    if sum(map(sum, rows)) != remainder:
        raise ConfigError(f"{where}: offsets {offset} sum to {sum(map(sum, rows))}; they must sum to "
                          f"n_layer % (pipeline_stage * pp_interleave_num) = {n_layer} % {total} = {remainder}")
    counts = [[base + rows[c][s] for s in range(pp)] for c in range(interleave)]
    flat = [n for row in counts for n in row]
    if min(flat) < 1:
        raise ConfigError(f"{where}: offsets {offset} leave a pipeline chunk with {min(flat)} layers "
                          f"(layers per chunk {counts})")
    stage_of, chunk_of = [], []
    for c in range(interleave):
        for s in range(pp):
            stage_of += [s] * counts[c][s]
            chunk_of += [c] * counts[c][s]
    return StageLayout(stage_of=stage_of, chunk_of=chunk_of, layers_per_chunk=counts)


def per_stage_layers(counts, layout: StageLayout, pp: int, what: str) -> set[int]:
    """Layer ids selected by a recompute setting: True/False for all/none, or a per-stage count list.

    A count n for stage s picks n of its layers, spread round-robin over its interleave chunks (first
    layers of each chunk first), as MindFormers allocates recompute layers.
    """
    if isinstance(counts, bool):
        return set(range(len(layout.stage_of))) if counts else set()
    if not isinstance(counts, list) or len(counts) != pp:
        raise ConfigError(f"{what}: expected true/false or a list of {pp} per-stage layer counts, got {counts!r}")
    chosen: set[int] = set()
    for s, n in enumerate(counts):
        if isinstance(n, bool):
            n = 10 ** 9 if n else 0
        chunks = sorted({layout.chunk_of[i] for i in layout.layers_on(s)})
        queues = {c: [i for i in layout.layers_on(s) if layout.chunk_of[i] == c] for c in chunks}
        while n > 0 and any(queues.values()):
            for c in chunks:
                if n > 0 and queues[c]:
                    chosen.add(queues[c].pop(0))
                    n -= 1
    return chosen


def check_layout(cfg: TeleChatConfig, dims: ParallelDims, seq_length: int) -> list[Issue]:
    """Every reason the model cannot be split this way (errors) or will be split sub-optimally (warnings)."""
    issues: list[Issue] = []
    err = lambda f, m: issues.append(Issue("error", f, m))   # noqa: E731
    warn = lambda f, m: issues.append(Issue("warning", f, m))  # noqa: E731
    mp, hs = dims.mp, dims.head_split
    split_name = ("model_parallel" if dims.cp_ulysses == 1
                  else f"model_parallel x ulysses degree ({mp} x {dims.cp_ulysses})")
    if cfg.n_head % hs:
        err("parallel_config.model_parallel", f"n_head {cfg.n_head} is not divisible by {split_name} = {hs}: "
            "attention heads are split whole across ranks")
    k = cfg.num_key_value_heads
    if k % hs:
        err("parallel_config.model_parallel",
            f"num_key_value_heads {k} is not divisible by {split_name} = {hs}: the fused key_value weight "
            "[k_h; v_h] per kv head must be split by whole kv heads; use a model_parallel that divides "
            f"{k} (e.g. {max(d for d in range(1, k + 1) if k % d == 0 and d <= hs)}) and raise "
            "pipeline_stage or data_parallel instead")
    if cfg.ffn_hidden_size % mp:
        err("parallel_config.model_parallel", f"ffn_hidden_size {cfg.ffn_hidden_size} is not divisible by "
            f"model_parallel {mp} (w1/w3 are column-parallel, w2 row-parallel)")
    if cfg.hidden_size % mp:
        err("parallel_config.model_parallel", f"hidden_size {cfg.hidden_size} is not divisible by model_parallel {mp}")
    if not dims.vocab_emb_dp and cfg.vocab_size % (mp * dims.cp):
        warn("parallel_config.vocab_emb_dp", f"vocab_size {cfg.vocab_size} is not divisible by model_parallel x "
             f"context_parallel = {mp * dims.cp}: the embedding and lm_head stay replicated")
    if dims.cp_ulysses < 1 or dims.cp % dims.cp_ulysses:
        err("parallel_config.ulysses_degree_in_cp", f"Ulysses degree {dims.cp_ulysses} does not divide "
            f"context_parallel {dims.cp}")
    seq_split = dims.cp * (mp if dims.sp else 1)
    if seq_length % seq_split:
        what = "context_parallel x model_parallel (sequence parallel)" if dims.sp else "context_parallel"
        err("model.model_config.seq_length", f"seq_length {seq_length} is not divisible by {what} = {seq_split}")
    if dims.cp > 1 and not cfg.use_flash_attention:
        err("parallel_config.context_parallel", "context_parallel > 1 needs model_config.use_flash_attention: "
            "true (ring attention and Ulysses run inside the Ascend flash-attention kernel)")
    if dims.sp and mp == 1:
        warn("parallel_config.use_seq_parallel", "sequence parallel has no effect with model_parallel 1")
    if cfg.is_moe:
        if cfg.num_experts % dims.ep:
            err("parallel_config.expert_parallel", f"expert_parallel {dims.ep} does not divide num_experts "
                f"{cfg.num_experts}: every rank of an expert-parallel group holds whole experts")
        if dims.dp % dims.ep:
            err("parallel_config.expert_parallel", f"expert_parallel {dims.ep} does not divide data_parallel "
                f"{dims.dp}: experts are split over data-parallel ranks (world = dp x mp x pp x cp)")
    elif dims.ep > 1:
        err("parallel_config.expert_parallel", f"expert_parallel {dims.ep} needs an MoE model (num_experts > 1)")
    if dims.pp > 1:
        if dims.micro < dims.pp:
            err("parallel_config.micro_batch_num", f"micro_batch_num {dims.micro} must be >= pipeline_stage "
                f"{dims.pp} (MindSpore's pipeline needs at least one micro batch per stage)")
        if dims.interleave > 1 and dims.micro % dims.pp:
            err("parallel_config.micro_batch_num", f"with pipeline interleave, micro_batch_num {dims.micro} "
                f"must be a multiple of pipeline_stage {dims.pp}")
    else:
        if dims.micro > 1:
            warn("parallel_config.micro_batch_num", "micro batches are only used with pipeline_stage > 1")
        if dims.interleave > 1:
            err("parallel_config.pp_interleave_num", "pp_interleave_num > 1 needs pipeline_stage > 1")
    return issues
