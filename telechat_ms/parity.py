"""MindSpore vs torch-reference parity on one HF checkpoint: the check behind `telechat-ms parity`."""
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
