"""Inference: kv-cache generation (greedy / sampling), streaming text, chat, batch prediction.

Nothing here imports MindSpore at import time except through the modules that need it (kv_cache, generate).
"""
from telechat_ms.infer.gen_config import GenerationConfig
from telechat_ms.infer.sampling import (apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p,
                                        process_logits, select_tokens)
from telechat_ms.infer.streaming import TextStreamer

__all__ = ["GenerationConfig", "TextStreamer", "apply_repetition_penalty", "apply_temperature", "apply_top_k",
           "apply_top_p", "process_logits", "select_tokens"]
