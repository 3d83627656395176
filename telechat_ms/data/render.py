"""Training rendering and loss masks (spec 6): the chat template's text, encoded, with per-token supervision."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from telechat_ms import special_tokens as st
from telechat_ms.chat_template import render_messages
from telechat_ms.data.formats import Example
from telechat_ms.data.tokenizer import TeleChatTokenizer

# released: every <_bot>, answer, <_end> and every <_user> (the released "multi-turn mask loss").
# answer-only: answer tokens and their <_end> (the MindSpore port).
LOSS_MASKS = ("released", "answer-only")


@dataclass
class Encoded:
    """Token ids and a boolean supervision mask of one example; `prefix_len` tokens form its system block."""

    ids: np.ndarray
    mask: np.ndarray
    prefix_len: int
    packable: bool
    where: str
    is_chat: bool = True

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def render_training_parts(example: Example) -> tuple[str, str]:
    """(system block, turns) of a conversation as the template renders it, minus the `\\n` after the last <_end>.

    The turns always start with a control token, so encoding the two parts separately equals encoding the whole.
    """
    parts = render_messages(example.messages, tools=example.tools)
    turns = "".join(parts[1:])
    suffix = st.END + "\n"
    return parts[0], turns[:-1] if turns.endswith(suffix) else turns


def render_training_text(example: Example) -> str:
    """The template's text of a full conversation, minus the `\\n` after the last <_end> (no BOS)."""
    return "".join(render_training_parts(example))


def loss_mask(ids: np.ndarray, mode: str = "released") -> np.ndarray:
    """Boolean mask of supervised targets, found from the control ids alone (content never holds them)."""
    if mode not in LOSS_MASKS:
        raise ValueError(f"unknown loss mask {mode!r} (expected one of {LOSS_MASKS})")
    ids = np.asarray(ids)
    n = ids.shape[0]
    ends = np.flatnonzero(ids == st.EOS_ID)
    bots = np.flatnonzero(ids == st.BOT_ID)
    # each <_bot> supervises through the first <_end> after it; a truncated answer (none) runs to the end
    stops = np.append(ends, n - 1)[np.searchsorted(ends, bots, side="right")] + 1
    mask = np.zeros(n, dtype=bool)
    for start, stop in zip((bots + (mode == "answer-only")).tolist(), stops.tolist()):
        mask[start:stop] = True
    if mode == "released":
        mask[ids == st.USER_ID] = True
    return mask


def encode_example(example: Example, tokenizer: TeleChatTokenizer, mode: str = "released") -> Encoded:
    """Encode one validated example into ids + mask (pretrain: text + <_end>, all supervised)."""
    if not example.is_chat:
        return encode_examples([example], tokenizer, mode)[0]
    system, turns = render_training_parts(example)
    prefix = tokenizer.encode_memo(system)
    ids = np.asarray(prefix + tokenizer.encode(turns), dtype=np.int32)
    return Encoded(ids, loss_mask(ids, mode), len(prefix), example.packable, example.where)


def encode_examples(examples: Sequence[Example], tokenizer: TeleChatTokenizer,
                    mode: str = "released") -> list[Encoded]:
    """encode_example of many examples, their texts encoded in one batch (TeleChatTokenizer.encode_batch)."""
    texts = [e.text if not e.is_chat else render_training_parts(e) for e in examples]
    bodies = tokenizer.encode_batch([t if isinstance(t, str) else t[1] for t in texts])
    with_prompt = [e.prompt for e in examples if not e.is_chat and e.prompt]
    prompt_ids = iter(tokenizer.encode_batch(with_prompt)) if with_prompt else iter(())
    out = []
    for example, text, body in zip(examples, texts, bodies):
        if not example.is_chat:
            ids = np.asarray(body + [st.EOS_ID], dtype=np.int32)
            mask = np.ones(ids.shape[0], dtype=bool)
            if example.prompt:  # the prompt's tokens (as lm-eval splits context + continuation) are not supervised
                mask[:min(len(next(prompt_ids)), len(body))] = False
            out.append(Encoded(ids, mask, 0, True, example.where, is_chat=False))
            continue
        prefix = tokenizer.encode_memo(text[0])
        ids = np.asarray(prefix + body, dtype=np.int32)
        out.append(Encoded(ids, loss_mask(ids, mode), len(prefix), example.packable, example.where))
    return out


def labels_from_mask(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """int32 labels: the token where supervised, IGNORE_INDEX (-100) elsewhere; not shifted (the model shifts)."""
    return np.where(mask, ids, st.IGNORE_INDEX).astype(np.int32)
