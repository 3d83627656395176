"""The arithmetic that sizes a paged kv cache and bounds a serving step's activations (no MindSpore: `plan`
uses it too): bytes per token, the block count from a block count or a memory budget, the activations of the
largest call the paged engine's scheduler (telechat_ms.serve.paged_engine) lets a step make."""
from __future__ import annotations

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def kv_bytes_per_token(cfg, mp: int = 1) -> int:
    """Bytes of cache one token takes (on each of mp NPUs: blocks are split by whole kv heads): a key and a value of
    every kv head in every layer."""
    return 2 * cfg.n_layer * (cfg.num_key_value_heads // mp) * cfg.head_dim * DTYPE_BYTES[cfg.compute_dtype]


DEFAULT_KV_CACHE_BYTES = 1 << 30   # the cache when neither a block count nor a budget is given (at most what
#                                    max_batch_size sequences of max_model_len can fill)
ATTN_CONTEXT = 4096   # a prefill chunk's width x gathered context stays within max_num_batched_tokens x this


def plan_num_blocks(cfg, max_model_len: int, max_batch_size: int, block_size: int, num_blocks: int | None = None,
                    memory_bytes: int | None = None, mp: int = 1) -> int:
    """Blocks of the cache (the null block included): `num_blocks` as given, else what `memory_bytes` (default
    DEFAULT_KV_CACHE_BYTES; on each of mp NPUs, which hold 1/mp of every block) holds, never more than
    max_batch_size full-length sequences use. Independent of max_model_len once the budget binds."""
    if num_blocks is not None:
        return int(num_blocks)
    per_block = kv_bytes_per_token(cfg, mp) * block_size
    budget = DEFAULT_KV_CACHE_BYTES if memory_bytes is None else int(memory_bytes)
    every_row_full = max_batch_size * -(-max_model_len // block_size) + 1
    return int(min(every_row_full, budget // per_block))


def call_activation_bytes(cfg, rows: int, width: int, ctx: int, area: int | None = None, mp: int = 1) -> int:
    """Upper estimate of one paged call's activations (one layer's live tensors, fp32 compute): scores and
    probabilities [R, N, n, C], the mask as uint8 and twice as fp32, the gathered keys and values and their
    transposed copies [R, C, K, d], the dense activations [R, n, 5H + 4F] and the logits [R, V]. `area` bounds
    n x C when the scheduler does (prefill chunks). mp: on each of mp NPUs (heads and ffn split by mp)."""
    f32, db = 4, DTYPE_BYTES[cfg.compute_dtype]
    nc = rows * width * ctx if area is None else area
    attn = 2 * (cfg.n_head // mp) * nc * f32 + nc * (1 + 2 * f32)
    gathered = 2 * 2 * rows * ctx * (cfg.num_key_value_heads // mp) * cfg.head_dim * db
    dense = rows * width * (5 * cfg.hidden_size + 4 * cfg.ffn_hidden_size // mp) * f32
    return attn + gathered + dense + rows * cfg.vocab_size * f32


def chunk_area(max_num_batched_tokens: int, max_ctx: int, min_width: int = 32) -> int:
    """The most width x context a prefill chunk computes: max_num_batched_tokens x ATTN_CONTEXT (narrower chunks
    deep in a long prompt), or the narrowest chunk over the longest context."""
    return max(max_num_batched_tokens * ATTN_CONTEXT, min(min_width, max_num_batched_tokens) * max_ctx)


def step_activation_bytes(cfg, max_num_batched_tokens: int, max_batch_size: int, max_ctx: int,
                          min_width: int = 32, mp: int = 1) -> int:
    """The most a step's largest call takes: a decode call of max_batch_size rows over max_ctx, or a prefill chunk
    (width <= max_num_batched_tokens, width x context <= chunk_area)."""
    decode = call_activation_bytes(cfg, max_batch_size, 1, max_ctx, mp=mp)
    area = min(chunk_area(max_num_batched_tokens, max_ctx, min_width), max_num_batched_tokens * max_ctx)
    prefill = call_activation_bytes(cfg, 1, max_num_batched_tokens, max_ctx, area=area, mp=mp)
    return max(decode, prefill)


def paged_capacity(cfg, free_bytes: float, seq: int, block_size: int = 16, mp: int = 1) -> tuple[int, int]:
    """(blocks, sequences of seq tokens) a paged cache holds in free_bytes on each of mp NPUs."""
    blocks = max(int(free_bytes // (kv_bytes_per_token(cfg, mp) * block_size)), 0)
    return blocks, blocks // -(-seq // block_size)
