"""Shared fixtures: paths to ../shared, and tiny random HF checkpoints written once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
META = SHARED / "telechat2_115b_meta"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture(scope="session")
def meta_dir(shared_dir: Path) -> Path:
    return shared_dir / "telechat2_115b_meta"


def _tiny_ckpt(tmp_path_factory, name: str, **kw) -> str:
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    overrides = kw.pop("config", {})
    out = str(tmp_path_factory.mktemp(name))
    write_random_hf_checkpoint(out, tiny_config(**overrides), **kw)
    return out


@pytest.fixture(scope="session")
def tiny_gqa_ckpt(tmp_path_factory) -> str:
    """4 heads / 2 kv heads, training_seqlen 32; q/k scaled up so positions matter."""
    return _tiny_ckpt(tmp_path_factory, "gqa", qk_scale=4.0, seed=1)


@pytest.fixture(scope="session")
def tiny_mha_ckpt(tmp_path_factory) -> str:
    return _tiny_ckpt(tmp_path_factory, "mha", config={"num_key_value_heads": 4}, qk_scale=4.0, seed=2)


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """Write a tiny HF checkpoint with the given dtype / format / shards."""
    def make(name: str, **kw) -> str:
        return _tiny_ckpt(tmp_path_factory, name, **kw)
    return make


os.environ.setdefault("GLOG_v", "3")  # keep MindSpore's C++ logging to errors


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """The shipped demo SFT data, tokenized with a demo tokenizer into 64-token MindRecord sequences."""
    from telechat_ms.data.process import ProcessOptions, process_data
    from telechat_ms.data.train_tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("demo")
    tok = train_tokenizer(str(root / "tok"), vocab_size=1024)
    mix = REPO / "telechat_ms" / "demo_data" / "demo_mix.json"
    process_data(ProcessOptions(data_mix=str(mix), tokenizer=str(root / "tok"), out=str(root / "data"),
                                max_seq_len=64, num_workers=1, progress=False))
    return {"tokenizer": str(root / "tok"), "data": str(root / "data"), "vocab_size": tok.vocab_size}


@pytest.fixture
def pynative_after():
    """Tests that train in-process switch MindSpore to GRAPH mode; give the next test PyNative back."""
    yield
    import mindspore as ms
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="session")
def tiny_moe_ckpt(tmp_path_factory) -> str:
    """An HF checkpoint of a tiny MoE (2 layers, 8 experts of 96, top-2, renormalized; GQA 4/2 heads)."""
    from telechat_ms.reference.random_checkpoint import tiny_moe_config, write_random_hf_checkpoint
    out = str(tmp_path_factory.mktemp("moe"))
    return write_random_hf_checkpoint(out, tiny_moe_config(), qk_scale=4.0, seed=3)
