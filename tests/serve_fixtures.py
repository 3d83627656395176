"""Shared by the serve tests: a tiny random TeleChat2 checkpoint with a demo tokenizer of the same vocabulary, and
helpers to read Prometheus metrics."""
from __future__ import annotations

import os

import numpy as np
import pytest

MAX_LEN = 256          # --max-model-len of the test servers (prefill widths 32, 64, 128, 256)
SEED_WEIGHTS = 1


@pytest.fixture(scope="module")
def serve_model_dir(tmp_path_factory) -> str:
    """HF checkpoint (training_seqlen 32, so prompts cross the NTK boundary) + tokenizer.model in one directory."""
    from telechat_ms.data.train_tokenizer import train_tokenizer
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    root = tmp_path_factory.mktemp("serve")
    tok = train_tokenizer(str(root / "tok"), vocab_size=1024)
    model_dir = str(root / "model")
    write_random_hf_checkpoint(model_dir, tiny_config(vocab_size=tok.vocab_size, seq_length=256), qk_scale=4.0,
                               seed=SEED_WEIGHTS)
    tok.save_pretrained(model_dir)
    assert os.path.isfile(os.path.join(model_dir, "tokenizer.model"))
    return model_dir


@pytest.fixture(scope="module")
def tokenizer(serve_model_dir):
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    return TeleChatTokenizer.from_pretrained(serve_model_dir)


@pytest.fixture(scope="module")
def ref_model(serve_model_dir):
    """A second instance of the served weights, for model.generate / full-forward references."""
    from telechat_ms.model.telechat import TeleChatForCausalLM
    return TeleChatForCausalLM.from_pretrained(serve_model_dir)


def metric(text: str, name: str, **labels: str) -> float:
    """Value of one sample in a Prometheus exposition (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def random_ids(n: int, seed: int, vocab: int) -> list[int]:
    """n ordinary token ids (no special ids 0..8)."""
    return np.random.default_rng(seed).integers(9, vocab, size=n).tolist()
