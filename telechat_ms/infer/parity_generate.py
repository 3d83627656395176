"""Generation parity: telechat_ms kv-cache decoding vs the torch reference's own kv-cache loop on one checkpoint.

Both follow the released incremental RoPE rule, so greedy tokens must agree one for one and the raw step logits to
~1e-5, also past training_seqlen (where neither equals a full forward). Meant for `telechat-ms parity --generate N`.
"""
from __future__ import annotations

import numpy as np


def run_generate_parity(model_dir: str, new_tokens: int = 32, prompt_len: int = 16, batch_size: int = 1,
                        device: str = "cpu", seed: int = 0, atol: float = 1e-4, use_jit: bool = True) -> dict:
    """Greedy-generate `new_tokens` from random prompts with both models; report agreement and max |delta logits|."""
    import torch

    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.reference.torch_model import TeleChatRef

    ref = TeleChatRef.from_pretrained(model_dir, dtype=torch.float32, device=device)
    model = TeleChatForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    ids = np.random.default_rng(seed).integers(9, cfg.vocab_size, size=(batch_size, prompt_len)).astype(np.int64)
    ours = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0,
                          eos_token_id=None, return_step_logits=True, use_jit=use_jit)
    with torch.no_grad():
        theirs = ref.generate(torch.from_numpy(ids).to(device), new_tokens, eos_token_id=None,
                              return_step_logits=True)
    ref_seqs = theirs.sequences.cpu().tolist()
    deltas = [float(np.abs(a - b.float().cpu().numpy()).max()) for a, b in zip(ours.step_logits, theirs.step_logits)]
    first_diff = None
    for row, (a, b) in enumerate(zip(ours.sequences, ref_seqs)):
        for pos, (x, y) in enumerate(zip(a, b)):
            if x != y:
                first_diff = {"row": row, "position": pos} if first_diff is None else first_diff
                break
    result = {
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "total_len": prompt_len + new_tokens,
        "training_seqlen": cfg.training_seqlen,
        "tokens_equal": ours.sequences == ref_seqs,
        "first_difference": first_diff,
        "max_abs_step_logits": max(deltas) if deltas else 0.0,
        "atol": atol,
    }
    result["ok"] = result["tokens_equal"] and result["max_abs_step_logits"] <= atol
    return result
