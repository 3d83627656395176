"""`make demo`: the main job end to end on CPU, offline, on the project's own sample data.

1. trains a small SentencePiece tokenizer with the TeleChat2 special tokens on the built-in demo data,
2. renders + tokenizes + packs the demo SFT data into MindRecord shards (the released chat format and loss mask),
3. fine-tunes a tiny TeleChat2 from yaml_configs/tiny/finetune_tiny_cpu.yaml in GRAPH mode,
4. loads the final model directory and answers a few questions with the chat template (greedy decoding).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is the capital of Australia?", "意大利的首都是哪里？", "78 × 25 等于多少？"]


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def answer(model, tokenizer, question: str, max_new_tokens: int = 48) -> str:
    """One chat turn; uses the model's chat() when the inference module provides it."""
    if hasattr(model, "chat"):
        reply, _ = model.chat(tokenizer, question, history=None, max_new_tokens=max_new_tokens, do_sample=False,
                              repetition_penalty=1.0)
        return reply
    import numpy as np
    import mindspore as ms
    from telechat_ms.data import apply_chat_template
    ids = tokenizer.encode(apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True))
    out = []
    for _ in range(max_new_tokens):
        logits = model(ms.Tensor(np.array([ids + out], dtype=np.int32))).asnumpy()[0, -1]
        nxt = int(logits.argmax())
        if nxt == tokenizer.eos_token_id:
            break
        out.append(nxt)
    return tokenizer.decode(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "demo_out"))
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    t0 = time.time()
    from telechat_ms.data.process import ProcessOptions, format_summary, process_data
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    from telechat_ms.data.train_tokenizer import train_tokenizer

    tok_dir, data_dir, run_dir = (os.path.join(args.out, d) for d in ("tokenizer", "data", "run"))
    _banner("1/4 demo tokenizer (SentencePiece BPE, TeleChat2 special tokens at ids 0..8)")
    tokenizer = train_tokenizer(tok_dir, vocab_size=3000)
    print(f"{tok_dir}: {tokenizer.vocab_size} pieces")

    _banner("2/4 process-data: chat template, multi-turn loss mask, packing, MindRecord")
    summary = process_data(ProcessOptions(data_mix=os.path.join(REPO, "telechat_ms", "demo_data", "demo_mix.json"),
                                          tokenizer=tok_dir, out=data_dir, max_seq_len=256, num_workers=2,
                                          overwrite=True, progress=False))
    print(format_summary(summary))

    _banner("3/4 fine-tune a tiny TeleChat2 on CPU (yaml_configs/tiny/finetune_tiny_cpu.yaml)")
    from telechat_ms.job_config import load_job_config
    from telechat_ms.train.trainer import train
    job = load_job_config(os.path.join(REPO, "yaml_configs", "tiny", "finetune_tiny_cpu.yaml"),
                          [f"train_dataset.data_dir={data_dir}", f"output_dir={run_dir}",
                           f"model.model_config.vocab_size={tokenizer.vocab_size}",
                           f"runner_config.max_steps={args.steps}", "callbacks.log_interval=25"])
    if os.path.isdir(run_dir):
        import shutil
        shutil.rmtree(run_dir)
    result = train(job)
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    print(f"loss {first:.3f} (first 10 steps) -> {last:.3f} (last 10 steps); curve: {run_dir}/loss_curve.png")

    _banner("4/4 chat with the trained model (from its final directory)")
    import mindspore as ms
    ms.set_context(mode=ms.PYNATIVE_MODE)
    from telechat_ms.model.telechat import TeleChatForCausalLM
    model = TeleChatForCausalLM.from_pretrained(result.final_dir)
    tokenizer = TeleChatTokenizer.from_pretrained(result.final_dir)
    for q in QUESTIONS:
        print(f"user: {q}\nbot:  {answer(model, tokenizer, q)}", flush=True)
    print(f"\ndemo finished in {time.time() - t0:.0f} s; everything is under {args.out}")
    return 0 if last < first else 1


if __name__ == "__main__":
    sys.exit(main())
