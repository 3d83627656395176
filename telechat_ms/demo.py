"""`make demo`: the main job end to end on CPU, offline, on the project's own sample data.

1. trains a small SentencePiece tokenizer with the TeleChat2 special tokens on the built-in demo data,
2. renders + tokenizes + packs the demo SFT data into MindRecord shards (the released chat format and loss mask),
3. fine-tunes a tiny TeleChat2 from yaml_configs/tiny/finetune_tiny_cpu.yaml in GRAPH mode,
4. loads the final model directory and answers a few questions with the chat template (greedy decoding),
5. serves it with `telechat-ms serve`'s engine and asks the same questions at once through the OpenAI API.
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
    """One chat turn (the released chat template, greedy)."""
    reply, _ = model.chat(tokenizer, question, history=None, max_new_tokens=max_new_tokens, do_sample=False,
                          repetition_penalty=1.0)
    return reply


def ask_server(url: str, question: str, max_tokens: int = 48) -> dict:
    """POST one question to the server's OpenAI-compatible /v1/chat/completions (standard library only)."""
    import json
    import urllib.request
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": question}], "temperature": 0,
                       "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp)


def metric(url: str, name: str) -> float:
    """One sample of the server's Prometheus metrics."""
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def serve_and_ask(model_dir: str) -> None:
    """Serve the trained model (continuous batching, OpenAI API) on a free local port and ask it all at once."""
    from concurrent.futures import ThreadPoolExecutor
    from telechat_ms.serve.server import ServeConfig, ServerThread, build_state
    state = build_state(ServeConfig(model_dir=model_dir, served_model_name="demo", max_batch_size=4,
                                    max_model_len=256, warmup=False))
    server = ServerThread(state).start()
    try:
        print(f"telechat-ms serve {model_dir} on {server.url} (web chat at {server.url}/)")
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:   # three users at once share the decode steps
            replies = list(pool.map(lambda q: ask_server(server.url, q), QUESTIONS))
        for q, r in zip(QUESTIONS, replies):
            print(f"user: {q}\nbot:  {r['choices'][0]['message']['content']}  [{r['usage']['completion_tokens']} "
                  f"tokens]", flush=True)
        print(f"GET {server.url}/metrics: telechat_batch_rows_max {metric(server.url, 'telechat_batch_rows_max'):g} "
              f"(most requests in the batch at once)")
    finally:
        server.stop()


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
    _banner("1/5 demo tokenizer (SentencePiece BPE, TeleChat2 special tokens at ids 0..8)")
    tokenizer = train_tokenizer(tok_dir, vocab_size=3000)
    print(f"{tok_dir}: {tokenizer.vocab_size} pieces")

    _banner("2/5 process-data: chat template, multi-turn loss mask, packing, MindRecord")
    summary = process_data(ProcessOptions(data_mix=os.path.join(REPO, "telechat_ms", "demo_data", "demo_mix.json"),
                                          tokenizer=tok_dir, out=data_dir, max_seq_len=256, num_workers=2,
                                          overwrite=True, progress=False))
    print(format_summary(summary))

    _banner("3/5 fine-tune a tiny TeleChat2 on CPU (yaml_configs/tiny/finetune_tiny_cpu.yaml)")
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

    _banner("4/5 chat with the trained model (from its final directory)")
    import mindspore as ms
    ms.set_context(mode=ms.PYNATIVE_MODE)
    from telechat_ms.model.telechat import TeleChatForCausalLM
    model = TeleChatForCausalLM.from_pretrained(result.final_dir)
    tokenizer = TeleChatTokenizer.from_pretrained(result.final_dir)
    for q in QUESTIONS:
        print(f"user: {q}\nbot:  {answer(model, tokenizer, q)}", flush=True)

    _banner("5/5 serve it: OpenAI-compatible API with continuous batching (telechat-ms serve)")
    serve_and_ask(result.final_dir)
    print(f"\ndemo finished in {time.time() - t0:.0f} s; everything is under {args.out}")
    return 0 if last < first else 1


if __name__ == "__main__":
    sys.exit(main())
