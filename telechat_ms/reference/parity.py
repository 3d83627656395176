"""MindSpore vs torch-reference parity on one HF checkpoint: the checks behind `telechat-ms parity [--generate N]`.

`run_parity` compares a full forward (logits, loss); `run_generate_parity` compares kv-cache decoding. Both follow
the released incremental RoPE rule, so greedy tokens must agree one for one and the raw step logits to ~1e-5, also
past training_seqlen (where neither equals a full forward).
"""
from __future__ import annotations

import numpy as np


def run_parity(model_dir: str, seq_len: int = 32, batch_size: int = 2, device: str = "cpu", seed: int = 0,
               atol: float = 1e-4, loss_atol: float = 1e-5) -> dict:
    """Run the same random ids through both models; report logit/loss differences and greedy agreement.

    max_rel is max|delta| / max|reference logit|, robust to logits near zero.
    """
    import torch
    import mindspore as ms

    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.reference.torch_model import TeleChatRef

    ref = TeleChatRef.from_pretrained(model_dir, dtype=torch.float32, device=device)
    model = TeleChatForCausalLM.from_pretrained(model_dir)
    vocab = model.config.vocab_size
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch_size, seq_len)).astype(np.int64)

    with torch.no_grad():
        out = ref(torch.from_numpy(ids).to(device), labels=torch.from_numpy(ids).to(device))
    ref_logits = out.logits.float().cpu().numpy()
    ref_loss = float(out.loss)

    ms_ids = ms.Tensor(ids.astype(np.int32))
    ms_logits = model(ms_ids).asnumpy()
    ms_loss = float(model(ms_ids, ms_ids).asnumpy())

    delta = np.abs(ms_logits - ref_logits)
    result = {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "max_abs": float(delta.max()),
        "max_rel": float(delta.max() / max(np.abs(ref_logits).max(), 1e-12)),
        "loss_ms": ms_loss,
        "loss_ref": ref_loss,
        "loss_delta": abs(ms_loss - ref_loss),
        "greedy_agreement": float((ms_logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
        "atol": atol,
    }
    result["ok"] = result["max_abs"] <= atol and result["loss_delta"] <= loss_atol
    return result


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
