"""Fixtures of the predict tests: a random checkpoint of the tiny preset with the demo tokenizer beside it (the
model yaml_configs/tiny/predict_tiny_cpu.yaml describes)."""
from __future__ import annotations

import os

import pytest

from tests.conftest import REPO

TINY_PREDICT_YAML = os.path.join(REPO, "yaml_configs", "tiny", "predict_tiny_cpu.yaml")


@pytest.fixture(scope="session")
def tiny_predict_dir(tmp_path_factory) -> str:
    from telechat_ms.data.train_tokenizer import train_tokenizer
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    out = str(tmp_path_factory.mktemp("tiny_predict"))
    tok = train_tokenizer(out)
    write_random_hf_checkpoint(out, tiny_config(hidden_size=128, ffn_hidden_size=256, vocab_size=tok.vocab_size,
                                                training_seqlen=256, base_seqlen=256, seq_length=256),
                               qk_scale=4.0, seed=7)
    return out
