"""What a sequence sends back after each step: text pieces that never split UTF-8 or a stop string.

Text comes from telechat_ms.infer.TextStreamer (incomplete byte-fallback characters are held back). On top of it,
the tail of the text that could still become a stop string is held back too, so a stop string is never half
streamed and then taken back; when one appears the answer ends before it (OpenAI semantics).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from telechat_ms.infer.streaming import TextStreamer


@dataclass
class TokenLogprob:
    """Log-prob of one produced token under the raw model logits, and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """One update of one sequence: new text, the tokens behind it, and the end when it comes."""

    index: int                                  # the choice this sequence answers
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None            # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None        # the stop string or stop token id that ended it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _held_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class OutputBuilder:
    """Incremental text of one sequence with stop-string handling; add() returns the text that may go out now."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), skip_special_tokens: bool = True):
        self.streamer = TextStreamer(tokenizer, skip_special_tokens=skip_special_tokens)
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""        # decoded so far (emitted + held back)
        self.sent = 0         # characters of self.text already emitted
        self.stopped_by: str | None = None

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _release(self, piece: str, final: bool) -> str:
        search_from = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        if self.stops:
            hit = self._find_stop(search_from)
            if hit is not None:
                self.text, self.stopped_by = self.text[:hit[0]], hit[1]
                final = True
        end = len(self.text) if final or not self.stops else len(self.text) - _held_prefix(self.text, self.stops)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def add(self, token: int) -> str:
        """Feed one produced (non-stop) token; the text it releases. Check .stopped_by afterwards."""
        return self._release(self.streamer.put(token), final=False)

    def finish(self) -> str:
        """Everything still held back (at the end of the sequence, for any reason but a stop string)."""
        if self.stopped_by is not None:
            return ""
        return self._release(self.streamer.end(), final=True)
