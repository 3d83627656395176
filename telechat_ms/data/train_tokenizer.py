"""Train a small TeleChat2-compatible SentencePiece tokenizer (BPE, byte fallback, split digits, ids 0..8 fixed).

For offline demos and tests: the real 131072-piece model cannot be downloaded on a fresh machine, and this one
is used by the very same TeleChatTokenizer class.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from telechat_ms import special_tokens as st
from telechat_ms.data.formats import parse_line
from telechat_ms.data.render import render_training_text
from telechat_ms.data.tokenizer import TOKENIZER_FILE, TeleChatTokenizer
from telechat_ms.errors import DataError

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo_data"
DEMO_INPUTS = (DEMO_DIR / "sft_demo.jsonl", DEMO_DIR / "pretrain_demo.jsonl")


def corpus_sentences(paths: Iterable[str]) -> Iterator[str]:
    """Plain-text lines of jsonl files: rendered conversations minus control strings, or pretrain text."""
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                task = "pretrain" if isinstance(record, dict) and ({"text", "prompt", "completion"} & set(record)) \
                    else "sft"
                example = parse_line(line, f"{path}:{line_no}", task)
                text = example.text if task == "pretrain" else render_training_text(example)
                for tok in st.SPECIAL_TOKENS:
                    text = text.replace(tok, "\n")
                yield from (part for part in text.split("\n") if part.strip())


def train_tokenizer(out_dir: str, inputs: Iterable[str] | None = None, vocab_size: int = 3000,
                    model_type: str = "bpe") -> TeleChatTokenizer:
    """Train on `inputs` (default: the shipped demo data) and save tokenizer.model + tokenizer_config.json."""
    paths = [os.fspath(p) for p in (inputs or DEMO_INPUTS)]
    for p in paths:
        if not os.path.isfile(p):
            raise DataError(f"{p}: tokenizer training input not found")
    sentences = list(corpus_sentences(paths))
    if not sentences:
        raise DataError(f"{', '.join(paths)}: no text to train a tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model,
        model_type=model_type, vocab_size=vocab_size, hard_vocab_limit=False,
        byte_fallback=True, split_digits=True, character_coverage=0.9995,
        unk_id=st.UNK_ID, bos_id=st.BOS_ID, eos_id=st.EOS_ID, pad_id=st.PAD_ID,
        unk_piece=st.UNK, bos_piece=st.START, eos_piece=st.END, pad_piece=st.PAD,
        control_symbols=[st.USER, st.BOT, st.SYSTEM, st.OBSERVATION, st.SEP],  # ids 4..8, as in the real model
        user_defined_symbols=["\n", "\t"],
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_by_whitespace=True, max_sentence_length=1 << 16,
        shuffle_input_sentence=False, num_threads=1, minloglevel=2,
    )
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, TOKENIZER_FILE)
    with open(target + ".tmp", "wb") as fh:
        fh.write(model.getvalue())
    os.replace(target + ".tmp", target)
    tokenizer = TeleChatTokenizer(target)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
