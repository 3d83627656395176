"""Inference on the tiny MoE: greedy generation with and without the kv cache, and the serving engine, give the
torch reference's tokens (no token is dropped at inference, so rows never affect each other); `convert ms2hf`
exports the HF release layout."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ms = pytest.importorskip("mindspore")

from telechat_ms.cli import main  # noqa: E402
from telechat_ms.model.telechat import TeleChatForCausalLM  # noqa: E402
from telechat_ms.reference.parity import run_generate_parity  # noqa: E402
from telechat_ms.reference.torch_model import TeleChatRef  # noqa: E402

NEW = 12


@pytest.fixture(scope="module")
def moe_serve_dir(tmp_path_factory) -> str:
    """A tiny MoE HF checkpoint with a demo tokenizer of its vocabulary in one directory."""
    from telechat_ms.data.train_tokenizer import train_tokenizer
    from telechat_ms.reference.random_checkpoint import tiny_moe_config, write_random_hf_checkpoint
    root = tmp_path_factory.mktemp("moe_serve")
    tok = train_tokenizer(str(root / "tok"), vocab_size=1024)
    model_dir = str(root / "model")
    write_random_hf_checkpoint(model_dir, tiny_moe_config(vocab_size=tok.vocab_size, seq_length=128), qk_scale=4.0,
                               seed=6)
    tok.save_pretrained(model_dir)
    return model_dir


def _reference_tokens(model_dir: str, prompts: list[list[int]], new: int) -> list[list[int]]:
    ref = TeleChatRef.from_pretrained(model_dir)
    with torch.no_grad():
        return [ref.generate(torch.tensor([p]), new, eos_token_id=None).sequences[0].tolist()[len(p):]
                for p in prompts]


def test_kv_cache_generation_matches_reference(tiny_moe_ckpt):
    result = run_generate_parity(tiny_moe_ckpt, new_tokens=24, prompt_len=16, batch_size=2)  # passes seqlen 32
    assert result["tokens_equal"], result
    assert result["max_abs_step_logits"] <= 1e-5, result


def test_generation_without_cache_matches_reference(tiny_moe_ckpt):
    """Greedy decoding by full forwards (no cache) within training_seqlen, where it equals cached decoding."""
    model = TeleChatForCausalLM.from_pretrained(tiny_moe_ckpt)
    prompts = np.random.default_rng(1).integers(9, 256, size=(2, 10)).tolist()
    ids = [list(p) for p in prompts]
    for _ in range(NEW):
        logits = model(ms.Tensor(np.array(ids, dtype=np.int32))).asnumpy()
        for row, nxt in zip(ids, logits[:, -1].argmax(-1)):
            row.append(int(nxt))
    reference = _reference_tokens(tiny_moe_ckpt, prompts, NEW)
    assert [row[10:] for row in ids] == reference
    cached = model.generate(prompts, max_new_tokens=NEW, eos_token_id=None, do_sample=False).new_tokens
    assert cached == reference


def test_serving_engine_matches_reference(moe_serve_dir):
    pytest.importorskip("fastapi")
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    from telechat_ms.serve.engine import Engine, Sequence
    from telechat_ms.serve.sampler import SamplingParams
    from telechat_ms.serve.server import full_forward_scorer, local_stepper_factory
    tok = TeleChatTokenizer.from_pretrained(moe_serve_dir)
    model = TeleChatForCausalLM.from_pretrained(moe_serve_dir)
    engine = Engine(local_stepper_factory(model), tok, tok.vocab_size, 64, max_batch_size=3, max_queue=4,
                    scorer=full_forward_scorer(model), warmup=False)
    engine.prepare()
    rng = np.random.default_rng(2)
    prompts = [rng.integers(9, tok.vocab_size, size=n).tolist() for n in (7, 19, 30)]
    seqs = [Sequence(list(p), SamplingParams(temperature=0.0, max_tokens=NEW), lambda d: None, index=0)
            for p in prompts]
    schedule = {0: [seqs[0]], 2: [seqs[1]], 4: [seqs[2]]}  # rows join while others decode
    for it in range(300):
        for seq in schedule.get(it, []):
            engine.submit([seq])
        if not engine.run_once() and it >= 4:
            break
    assert [s.output_ids for s in seqs] == _reference_tokens(moe_serve_dir, prompts, NEW)


def test_convert_ms2hf_exports_the_release_layout(tiny_moe_ckpt, tmp_path):
    from telechat_ms.checkpoint_io import checkpoint_entries
    ms_dir, hf_dir = str(tmp_path / "ms"), str(tmp_path / "hf")
    assert main(["convert", "hf2ms", tiny_moe_ckpt, ms_dir, "--quiet"]) == 0
    assert main(["convert", "ms2hf", ms_dir, hf_dir, "--quiet"]) == 0
    src = {e.name: e.read().tobytes() for e in checkpoint_entries(tiny_moe_ckpt)}
    out = {e.name: e.read().tobytes() for e in checkpoint_entries(hf_dir)}
    assert src == out
    assert "transformer.h.1.mlp.local_experts.7.down_proj.bias" in out and "transformer.h.0.mlp.router.weight" in out
    cfg = json.loads(open(os.path.join(hf_dir, "config.json"), encoding="utf-8").read())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["norm_topk_prob"]) == (8, 2, True)
