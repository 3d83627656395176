"""TeleChat2 tokenizer: SentencePiece plus the control-string splitting the released model needs (spec 4)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Iterable, Sequence

import sentencepiece as spm

from telechat_ms import special_tokens as st
from telechat_ms.errors import ConfigError, DataError
from telechat_ms.io import atomic_write_text

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_MEMO_SIZE = 256

# Longest alternative first is unnecessary (no token is a prefix of another), but keep the order stable.
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in st.SPECIAL_TOKENS) + ")")


def resolve_tokenizer_path(path: str) -> str:
    """Return the tokenizer.model file for `path` (a file, or a directory that contains tokenizer.model)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise DataError(f"{path}: tokenizer model not found (expected a tokenizer.model file or a directory with one)")
    return path


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in chunks (manifests record it so outputs can be traced to a tokenizer)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TeleChatTokenizer:
    """SentencePiece tokenizer with TeleChat2's special tokens at ids 0..8 and no automatic BOS/EOS."""

    def __init__(self, model_file: str):
        self.model_file = resolve_tokenizer_path(model_file)
        with open(self.model_file, "rb") as fh:
            self._model_bytes = fh.read()
        self._load()

    @classmethod
    def from_pretrained(cls, path: str) -> "TeleChatTokenizer":
        """Load from a tokenizer.model file or a directory holding one (HF-style entry point)."""
        return cls(path)

    @classmethod
    def for_model(cls, path: str, vocab_size: int) -> "TeleChatTokenizer":
        """The tokenizer at path, checked against a model's vocab_size (a tokenizer with more pieces than the
        model has rows would produce ids the model cannot embed)."""
        tokenizer = cls(path)
        if tokenizer.vocab_size > vocab_size:
            raise ConfigError(f"{tokenizer.model_file}: {tokenizer.vocab_size} pieces, but the model's vocab_size "
                              f"is {vocab_size}")
        return tokenizer

    def _load(self) -> None:
        """Build the SentencePiece processor from the stored model bytes and check the special ids."""
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError with terse text
            raise DataError(f"{self.model_file}: not a SentencePiece model ({exc})") from exc
        n = self.sp.get_piece_size()
        for tok, idx in st.SPECIAL_TOKEN_IDS.items():
            piece = self.sp.id_to_piece(idx) if idx < n else None
            if piece != tok:
                raise DataError(f"{self.model_file}: id {idx} must be the special token {tok!r}, found {piece!r}")
        self._special_of_id: dict[int, str | None] = {}  # filled lazily: scanning 131072 pieces costs ~0.3 s
        self._memo: dict[str, list[int]] = {}

    def __getstate__(self) -> dict:
        """Pickle the model bytes, not the C++ processor (for multiprocessing workers)."""
        return {"model_file": self.model_file, "_model_bytes": self._model_bytes}

    def __setstate__(self, state: dict) -> None:
        """Rebuild the processor after unpickling."""
        self.__dict__.update(state)
        self._load()

    # ---- properties -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of pieces (131072 for the released model)."""
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def sha256(self) -> str:
        """sha256 of the tokenizer.model bytes."""
        return hashlib.sha256(self._model_bytes).hexdigest()

    unk_token, bos_token, eos_token, pad_token = st.UNK, st.START, st.END, st.PAD
    user_token, bot_token, system_token = st.USER, st.BOT, st.SYSTEM
    unk_token_id, bos_token_id, eos_token_id, pad_token_id = st.UNK_ID, st.BOS_ID, st.EOS_ID, st.PAD_ID
    user_token_id, bot_token_id, system_token_id = st.USER_ID, st.BOT_ID, st.SYSTEM_ID
    observation_token_id, sep_token_id = st.OBSERVATION_ID, st.SEP_ID

    @property
    def special_tokens(self) -> dict[str, int]:
        """The nine TeleChat2 special tokens and their ids."""
        return dict(st.SPECIAL_TOKEN_IDS)

    # ---- encoding ---------------------------------------------------------------------------
    def split_special(self, text: str) -> list[str]:
        """Split text into alternating plain segments and special-token strings (empty segments dropped)."""
        return [part for part in _SPECIAL_RE.split(text) if part]

    def encode(self, text: str) -> list[int]:
        """Encode text: special strings map to their ids, every other segment is encoded by SentencePiece alone.

        One call per segment: a list call per text would start SentencePiece's thread pool each time, which costs
        more than the encoding of a typical turn.
        """
        ids: list[int] = []
        for part in _SPECIAL_RE.split(text):
            if not part:
                continue
            special = st.SPECIAL_TOKEN_IDS.get(part)
            if special is None:
                ids.extend(self.sp.encode(part))
            else:
                ids.append(special)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of many texts with one SentencePiece call for all their plain segments (same ids; the per-call
        cost, which exceeds that of encoding a short turn, is paid once)."""
        splits = [[part for part in _SPECIAL_RE.split(text) if part] for text in texts]
        plain = [part for parts in splits for part in parts if part not in st.SPECIAL_TOKEN_IDS]
        encoded = iter(self.sp.encode(plain, num_threads=1)) if plain else iter(())
        out: list[list[int]] = []
        for parts in splits:
            ids: list[int] = []
            for part in parts:
                special = st.SPECIAL_TOKEN_IDS.get(part)
                if special is None:
                    ids.extend(next(encoded))
                else:
                    ids.append(special)
            out.append(ids)
        return out

    def encode_memo(self, text: str) -> list[int]:
        """encode() remembering recent results: system prompts repeat across most records of a dataset."""
        ids = self._memo.get(text)
        if ids is None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            ids = self._memo[text] = self.encode(text)
        return list(ids)

    def encode_plain(self, text: str) -> list[int]:
        """Encode one segment with SentencePiece only (special strings stay text); the raw building block."""
        return self.sp.encode(text) if text else []

    def __call__(self, text: str) -> dict[str, list[int]]:
        """HF-style call: {'input_ids': encode(text)}."""
        return {"input_ids": self.encode(text)}

    # ---- decoding ---------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Inverse of encode: runs of ordinary ids are decoded together, special ids become their strings."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            special = self._special_piece(i)
            if special is None:
                run.append(i)
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            if not skip_special_tokens:
                out.append(special)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def _special_piece(self, idx: int) -> str | None:
        """The piece string of a control/unknown id, None for ordinary ids (memoised)."""
        try:
            return self._special_of_id[idx]
        except KeyError:
            if not 0 <= idx < self.vocab_size:
                raise DataError(f"token id {idx} out of range [0, {self.vocab_size})") from None
            special = None
            if self.sp.is_control(idx) or self.sp.is_unknown(idx):
                special = self.sp.id_to_piece(idx)
            self._special_of_id[idx] = special
            return special

    def id_to_piece(self, idx: int) -> str:
        """The piece string of one id (e.g. '▁hello', '<0x0A>', '<_bot>')."""
        if not 0 <= int(idx) < self.vocab_size:
            raise DataError(f"token id {idx} out of range [0, {self.vocab_size})")
        return self.sp.id_to_piece(int(idx))

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """Pieces for one id or a list of ids (HF name)."""
        if isinstance(ids, int):
            return self.id_to_piece(ids)
        return [self.id_to_piece(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Ids for one piece or a list of pieces (unknown pieces map to <_unk>)."""
        if isinstance(tokens, str):
            return self.sp.piece_to_id(tokens)
        return [self.sp.piece_to_id(t) for t in tokens]

    def is_special(self, idx: int) -> bool:
        """True for control/unknown pieces (the ones SentencePiece never emits from plain text)."""
        return self._special_piece(int(idx)) is not None

    # ---- saving -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str) -> str:
        """Write tokenizer.model and tokenizer_config.json into `directory`; returns the directory."""
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, TOKENIZER_FILE)
        if os.path.abspath(target) != os.path.abspath(self.model_file):
            tmp = target + ".tmp"
            shutil.copyfile(self.model_file, tmp)
            os.replace(tmp, target)
        config = {
            "tokenizer_class": "TeleChatTokenizer",
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": st.START,
            "eos_token": st.END,
            "pad_token": st.PAD,
            "unk_token": st.UNK,
            "special_tokens": dict(st.SPECIAL_TOKEN_IDS),
            "vocab_size": self.vocab_size,
            "sha256": self.sha256,
        }
        atomic_write_text(os.path.join(directory, TOKENIZER_CONFIG_FILE),
                          json.dumps(config, ensure_ascii=False, indent=2) + "\n")
        return directory

    def __repr__(self) -> str:
        return f"TeleChatTokenizer({self.model_file!r}, vocab_size={self.vocab_size})"
