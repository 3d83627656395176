"""A tiny TeleChat2 checkpoint whose greedy answer is known in advance, for the browser test of the web chat.

The web test must make the model itself write `<script>` (and an `<img onerror>`) and then see it shown as text. A
random model writes nothing predictable, so the checkpoint is built to be a bigram table: every layer's attention
output projection and MLP down projection (weights and biases) are zero, so each layer adds nothing to the residual
stream and the final hidden state is RMSNorm(embedding of the current token); lm_head row `b` is that normalised
embedding of token `a` for every planned transition a -> b (all other rows zero). The next token is then a function
of the current token alone, with a logit margin of >= 10 over every other token (checked), so greedy decoding, the
page's default sampling and any batch mates give the same answer. The answer starts at `<_bot>` (the prompt always
ends with it) and walks through pieces that each occur once (a repeated piece is written with its byte-fallback pieces
instead, which decode to the same characters), then repeats one loop piece until max_tokens: long answers for the
stop test, finished ones (finish_reason "length") for the others. Everything else is the stock random checkpoint
(telechat_ms.reference.random_checkpoint) with the demo tokenizer (telechat_ms.data.train_tokenizer).
"""
from __future__ import annotations

import os

import numpy as np

from telechat_ms import special_tokens as st

# `</SCRIPT>` closes the element as well as `</script>` (HTML tag names are case-insensitive) and keeps the pieces
# of the answer distinct enough for a bigram table.
ANSWER = "<script>alert(1)</SCRIPT>"
LOOP_PIECE = "\u2581the"
MARGIN = 10.0


def unique_pieces(tokenizer, text: str, reserved: set[int]) -> list[int]:
    """Ids that decode to `text`, none repeated and none in `reserved` (repeats become byte-fallback pieces)."""
    ids: list[int] = []
    for idx in tokenizer.encode(text):
        if idx in ids or idx in reserved:
            piece = tokenizer.id_to_piece(idx).replace("\u2581", " ")
            alternatives = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in piece.encode("utf-8")]
            if any(a in ids or a in reserved for a in alternatives) or len(set(alternatives)) < len(alternatives):
                raise ValueError(f"{text!r}: piece {piece!r} occurs too often for a bigram answer")
            ids.extend(alternatives)
        else:
            ids.append(idx)
    if tokenizer.decode(ids) != text:
        raise ValueError(f"{text!r}: the unique pieces decode to {tokenizer.decode(ids)!r}")
    return ids


def write_scripted_checkpoint(root: str, answer: str = ANSWER, loop_piece: str = LOOP_PIECE,
                              seq_length: int = 1024, vocab_size: int = 1024) -> dict:
    """Write tokenizer + checkpoint into root/model; returns the model dir, the answer's ids and the loop id."""
    import torch
    from safetensors.torch import load_file, save_file

    from telechat_ms.data.train_tokenizer import train_tokenizer
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    tok = train_tokenizer(os.path.join(root, "tok"), vocab_size=vocab_size)
    model_dir = os.path.join(root, "model")
    cfg = tiny_config(vocab_size=tok.vocab_size, seq_length=seq_length, training_seqlen=256, base_seqlen=256)
    write_random_hf_checkpoint(model_dir, cfg, seed=7)
    tok.save_pretrained(model_dir)

    loop = tok.convert_tokens_to_ids(loop_piece)
    if loop == st.UNK_ID:
        raise ValueError(f"{loop_piece!r} is not a piece of the demo tokenizer")
    chain = unique_pieces(tok, answer, reserved={st.BOT_ID, loop})
    sources = [st.BOT_ID, *chain, loop]
    targets = [*chain, loop, loop]
    file = os.path.join(model_dir, "model.safetensors")
    sd = load_file(file)
    for name in sd:
        if name.endswith(("self_attention.dense.weight", "self_attention.dense.bias", "mlp.down_proj.weight",
                          "mlp.down_proj.bias")):
            sd[name] = torch.zeros_like(sd[name])
    sd["transformer.ln_f.weight"] = torch.ones_like(sd["transformer.ln_f.weight"])
    emb = sd["transformer.word_embeddings.weight"].double()
    normed = emb / emb.pow(2).mean(-1, keepdim=True).add(cfg["layer_norm_epsilon"]).sqrt()  # what ln_f sees
    unit = normed / normed.norm(dim=-1, keepdim=True)
    head = torch.zeros_like(emb)
    for a, b in zip(sources, targets):
        head[b] += unit[a]  # the loop piece is the target of two sources
    logits = normed[sources] @ head.T  # [transitions, vocab], before scaling
    best = logits[torch.arange(len(sources)), targets]
    others = logits.clone()
    others[torch.arange(len(sources)), targets] = -np.inf
    gap = (best - others.max(-1).values).min().item()
    assert gap > 0, "two planned sources are too alike for a bigram table"
    scale = MARGIN / gap
    sd["lm_head.weight"] = (head * scale).float()
    save_file(sd, file, metadata={"format": "pt"})
    return {"model_dir": model_dir, "chain": chain, "loop": loop, "answer": answer,
            "tokenizer": os.path.join(model_dir, "tokenizer.model")}


def expected_answer(tokenizer, scripted: dict, max_tokens: int) -> str:
    """The text of a greedy answer of `max_tokens` tokens from the scripted checkpoint."""
    ids = (scripted["chain"] + [scripted["loop"]] * max_tokens)[:max_tokens]
    return tokenizer.decode(ids)
