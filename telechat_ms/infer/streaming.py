"""Incremental detokenization that never emits broken UTF-8.

Byte-fallback pieces (<0xE4><0xB8><0xAD> = "中") decode to U+FFFD until the character is complete, so text ending
in U+FFFD is held back. Only a short window of ids is decoded per token (the vLLM scheme): the window keeps one
already-emitted token in front, so SentencePiece's leading-space rule applies to it and not to the new text.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStreamer:
    """Feed token ids one at a time with put(); each call returns the newly printable text ("" when held)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = 0    # ids before this were emitted
        self.text = ""          # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def put(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly empty, possibly several characters)."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT) or not full.startswith(prefix):
            return ""
        piece = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += piece
        return piece

    def end(self) -> str:
        """Flush whatever is held back (an incomplete byte sequence becomes U+FFFD, as decode() gives it)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        piece = full[len(prefix):] if full.startswith(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += piece
        return piece
