"""Shared fixtures of the data tests: the real inputs in ../shared and a small tokenizer trained on demo data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_TOKENIZER = SHARED / "telechat2_115b_meta" / "tokenizer.model"
SAMPLE = SHARED / "sample_data"
SFT_FILES = ["demo_code", "demo_math", "demo_multi", "demo_role", "demo_single", "demo_tool"]
DEMO = REPO / "telechat_ms" / "demo_data"


def require_shared() -> None:
    """Skip when the shared real inputs are not next to the repository."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present (real TeleChat2 tokenizer and sample data)")


def rewrite_mix(src: Path, dst_dir: Path) -> Path:
    """Copy a released mix file into dst_dir with its `./dummy_data/...` paths pointing at ../shared/sample_data."""
    mix = json.loads(src.read_text(encoding="utf-8"))
    fixed = {str(SAMPLE / key.replace("./dummy_data/", "", 1)): weight for key, weight in mix.items()}
    dst = dst_dir / src.name
    dst.write_text(json.dumps(fixed), encoding="utf-8")
    return dst


def sample_lines(name: str, limit: int | None = None) -> list[str]:
    """Lines of a released sample SFT file (or 'pretrain_example')."""
    folder = "pretrain" if name.startswith("pretrain") else "sft"
    lines = (SAMPLE / folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return lines[:limit] if limit else lines


@pytest.fixture(scope="session")
def real_tok():
    """The released 131072-piece tokenizer."""
    require_shared()
    from telechat_ms.data import TeleChatTokenizer
    return TeleChatTokenizer(str(REAL_TOKENIZER))


@pytest.fixture(scope="session")
def demo_tok_dir(tmp_path_factory) -> Path:
    """A tokenizer trained on the shipped demo data (seconds), saved in a temporary directory."""
    from telechat_ms.data.train_tokenizer import train_tokenizer
    out = tmp_path_factory.mktemp("demo_tok")
    train_tokenizer(str(out), vocab_size=3000)
    return out


@pytest.fixture(scope="session")
def demo_tok(demo_tok_dir):
    from telechat_ms.data import TeleChatTokenizer
    return TeleChatTokenizer(str(demo_tok_dir))
