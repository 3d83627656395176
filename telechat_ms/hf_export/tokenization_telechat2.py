"""TeleChat2 tokenizer for transformers (`trust_remote_code=True`), shipped by telechat_ms in every HF export.

A slow SentencePiece tokenizer that maps the nine control strings (<_unk> ... <_sep>) to their ids 0..8 and encodes
every other segment with SentencePiece alone (spec 4: the rule telechat_ms.data.tokenizer implements). The released
tokenizer module registers only some of them, so a recent transformers splits `<_user>` into `<`, `_`, `user`, `>`;
here all nine are special tokens, never split, never stripped. No BOS/EOS is added. Copied as is into exported
directories: it imports nothing from telechat_ms.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import sentencepiece as spm
from transformers import AddedToken, PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
# The released control pieces, in id order (id = position). telechat_ms/special_tokens.py is the project's source;
# tests check this copy against it.
CONTROL_TOKENS = ("<_unk>", "<_start>", "<_end>", "<_pad>", "<_user>", "<_bot>", "<_system>", "<_observation>",
                  "<_sep>")
ROLE_TOKENS = CONTROL_TOKENS[4:]


def _special(token: str | AddedToken) -> AddedToken:
    """A control string kept whole: no stripping of neighbouring spaces, no single-word rule, no normalisation
    (whatever flags a saved tokenizer_config carries: the released one marks some single_word)."""
    return AddedToken(str(token), lstrip=False, rstrip=False, single_word=False, normalized=False, special=True)


class Telechat2Tokenizer(PreTrainedTokenizer):
    """SentencePiece BPE with TeleChat2's control strings at ids 0..8 (exact ids checked when loading)."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, unk_token: str | AddedToken = "<_unk>",
                 bos_token: str | AddedToken = "<_start>", eos_token: str | AddedToken = "<_end>",
                 pad_token: str | AddedToken = "<_pad>", add_bos_token: bool = False,
                 add_eos_token: bool = False, sp_model_kwargs: dict[str, Any] | None = None,
                 clean_up_tokenization_spaces: bool = False, **kwargs):
        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.sp_model_kwargs = sp_model_kwargs or {}
        self.sp_model = self._load(vocab_file)
        kwargs.pop("additional_special_tokens", None)  # always exactly the role tokens, in id order
        kwargs.pop("added_tokens_decoder", None)  # rebuilt from the model's own control ids below
        super().__init__(unk_token=_special(unk_token), bos_token=_special(bos_token), eos_token=_special(eos_token),
                         pad_token=_special(pad_token), additional_special_tokens=[_special(t) for t in ROLE_TOKENS],
                         add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                         sp_model_kwargs=self.sp_model_kwargs,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)
        for token in CONTROL_TOKENS:  # added tokens must have landed on the model's own control ids
            if self.convert_tokens_to_ids(token) != CONTROL_TOKENS.index(token):
                raise ValueError(f"{vocab_file}: {token!r} maps to id {self.convert_tokens_to_ids(token)}, "
                                 f"expected {CONTROL_TOKENS.index(token)}")

    def _load(self, vocab_file: str) -> spm.SentencePieceProcessor:
        sp = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        sp.Load(vocab_file)
        for idx, token in enumerate(CONTROL_TOKENS):
            piece = sp.id_to_piece(idx) if idx < sp.get_piece_size() else None
            if piece != token:
                raise ValueError(f"{vocab_file}: id {idx} must be the TeleChat2 control piece {token!r}, "
                                 f"found {piece!r}")
        return sp

    def __getstate__(self) -> dict:
        """Pickle without the C++ processor (multiprocessing workers rebuild it from the file)."""
        state = self.__dict__.copy()
        state["sp_model"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.sp_model = self._load(self.vocab_file)

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (131072 for the released model); the control tokens are among them."""
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        """Piece -> id for every piece (the control strings included, at their own ids)."""
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        """One segment between control strings, encoded by SentencePiece alone (its dummy prefix included)."""
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def _is_control(self, index: int) -> bool:
        """Control and unknown pieces: SentencePiece's decode drops them, so they are written by hand."""
        return self.sp_model.is_control(index) or self.sp_model.is_unknown(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Pieces back to text; control pieces are written as themselves (SentencePiece would drop them)."""
        return self._join([self.sp_model.piece_to_id(t) for t in tokens], skip_special_tokens=False)

    def _join(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Runs of ordinary ids are decoded together, each control id becomes its piece (or nothing when skipped):
        exactly telechat_ms.data.tokenizer.TeleChatTokenizer.decode."""
        out, run = [], []
        for index in ids:
            if not self._is_control(index):
                run.append(index)
                continue
            if run:
                out.append(self.sp_model.decode(run))
                run = []
            if not skip_special_tokens:
                out.append(self.sp_model.id_to_piece(index))
        if run:
            out.append(self.sp_model.decode(run))
        return "".join(out)

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: bool | None = None, **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        text = self._join(ids, skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None \
            else clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean else text

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        """BOS/EOS only when asked for (the released tokenizer_config says add_bos_token false)."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            out += bos + token_ids_1 + eos
        return out

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0: list[int],
                                             token_ids_1: list[int] | None = None) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Copy tokenizer.model into save_directory (what save_pretrained calls)."""
        if not os.path.isdir(save_directory):
            raise ValueError(f"{save_directory}: not a directory")
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        target = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
