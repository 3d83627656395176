"""`make demo`: the main job end to end on CPU, offline, and a number that shows the model learned.

1. writes a small task (telechat_ms.data.demo_exam): exam questions about capitals and languages in C-Eval's
   prompt format as practice, held-out questions (other wordings) as a C-Eval val CSV, and the same facts as chat,
2. trains a small SentencePiece tokenizer with the TeleChat2 special tokens,
3. process-data: one mix of practice questions (prompt-completion: plain text, the answer supervised) and chat
   turns (the released chat format and loss mask), and the held-out questions, into MindRecord shards,
4. scores the untrained model on the held-out questions with `telechat-ms eval --tasks ceval`,
5. fine-tunes a tiny TeleChat2 on the mix in GRAPH mode, measuring the held-out loss while it trains (do_eval;
   yaml_configs/tiny/finetune_tiny_cpu_exam.yaml),
6. scores it again with `telechat-ms eval` and prints both scores,
7. asks it a chat question with the chat template (greedy), and serves it with `telechat-ms serve`'s engine,
   asking questions at once through the OpenAI API.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is the capital of Australia?", "意大利的首都是哪里？", "What is the capital of Kenya?"]
CHECK = ("What is the capital of Canada?", "Ottawa")   # the last chat question and the word its answer must hold


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


def exam_score(model_dir: str, data_dir: str, out_dir: str) -> dict:
    """Accuracy on the held-out C-Eval val questions, from `telechat-ms eval`'s results.json (zero-shot, lm-eval's
    ceval-valid prompts and log-likelihood scoring)."""
    cmd = [sys.executable, "-m", "telechat_ms.cli", "eval", model_dir, "--tasks", "ceval", "--data-dir", data_dir,
           "--num-fewshot", "0", "--batch-size", "8", "--output", out_dir, "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GLOG_v": "3"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out_dir, "results.json"), encoding="utf-8") as fh:
        results = json.load(fh)
    rows = results["results"] if isinstance(results, dict) and "results" in results else results
    row = next(r for r in rows if r["task"] == "ceval" and r["metric"] == "acc" and not r.get("subject"))
    return {"acc": float(row["value"]), "n": int(row["n"]), "command": " ".join(cmd[3:])}


def _save_initial_model(job, out: str, tok_dir: str) -> str:
    """The model before any training (seeded random weights), as a model directory eval and train both read."""
    import mindspore as ms
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.weights import copy_tokenizer_files
    ms.set_seed(job.seed)
    TeleChatForCausalLM(job.model_config()).save_pretrained(out)
    copy_tokenizer_files(tok_dir, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "demo_out"))
    parser.add_argument("--steps", type=int, default=160, help="optimizer steps (batch 16)")
    parser.add_argument("--no-serve", action="store_true", help="skip the serving step")
    args = parser.parse_args(argv)
    t0 = time.time()
    from telechat_ms.data.demo_exam import write_heldout_records, write_task
    from telechat_ms.data.process import ProcessOptions, format_summary, process_data
    from telechat_ms.data.train_tokenizer import DEMO_INPUTS, train_tokenizer
    from telechat_ms.job_config import load_job_config

    out = args.out
    task_dir, tok_dir = os.path.join(out, "task"), os.path.join(out, "tokenizer")
    _banner("1/7 the task: exam questions on capitals and languages (C-Eval's format), held out by wording")
    paths = write_task(task_dir)
    heldout = write_heldout_records(paths["ceval"], os.path.join(task_dir, "heldout.jsonl"))
    print(f"practice: {paths['practice']}\nheld-out exam (C-Eval val layout): {paths['ceval']}\nchat: {paths['chat']}")

    _banner("2/7 demo tokenizer (SentencePiece BPE, TeleChat2 special tokens at ids 0..8)")
    tokenizer = train_tokenizer(tok_dir, [*map(str, DEMO_INPUTS), paths["practice"], paths["chat"]], vocab_size=3000)
    print(f"{tok_dir}: {tokenizer.vocab_size} pieces")

    _banner("3/7 process-data: exam rows (prompt-completion, the answer supervised) + chat rows (released mask)")
    mix = os.path.join(task_dir, "mix.json")
    with open(mix, "w", encoding="utf-8") as fh:
        json.dump({"practice.jsonl": 1, "chat.jsonl": 4}, fh)   # the chat turns four times: 96 rows beside 144
    data = {name: os.path.join(out, name) for name in ("train", "exam_eval")}
    # one record per row (--no-pack): a question is answered from its own text, not from its row-mates
    for name, src in (("train", mix), ("exam_eval", heldout)):
        summary = process_data(ProcessOptions(data_mix=src, tokenizer=tok_dir, out=data[name], max_seq_len=64,
                                              pack=False, num_workers=1, overwrite=True, progress=False))
        print(f"{name}: " + format_summary(summary).splitlines()[1].split(" (")[0])

    job = load_job_config(os.path.join(REPO, "yaml_configs", "tiny", "finetune_tiny_cpu_exam.yaml"),
                          [f"train_dataset.data_dir={data['train']}", f"eval_dataset.data_dir={data['exam_eval']}",
                           f"output_dir={os.path.join(out, 'run')}",
                           f"model.model_config.vocab_size={tokenizer.vocab_size}",
                           f"runner_config.max_steps={args.steps}"])
    init = _save_initial_model(job, os.path.join(out, "init"), tok_dir)
    _banner("4/7 score the untrained model: telechat-ms eval --tasks ceval (held-out questions)")
    before = exam_score(init, task_dir, os.path.join(out, "eval_before"))
    print(f"before training: {before['acc']:.1%} of {before['n']} held-out questions (chance: 25%)")

    _banner("5/7 fine-tune on CPU (yaml_configs/tiny/finetune_tiny_cpu_exam.yaml), held-out loss while training")
    from telechat_ms.train.trainer import train
    shutil.rmtree(os.path.join(out, "run"), ignore_errors=True)
    job.load_checkpoint = init
    result = train(job)
    print("held-out loss of the answers (do_eval): " + ", ".join(f"step {s}: {v:.3f}" for s, v in
                                                                  sorted(result.eval_losses.items())))
    print(f"curve: {os.path.join(out, 'run', 'loss_curve.png')}")

    _banner("6/7 score the fine-tuned model: telechat-ms eval --tasks ceval (the same held-out questions)")
    after = exam_score(result.final_dir, task_dir, os.path.join(out, "eval_after"))
    print(f"held-out exam accuracy: before {before['acc']:.1%} -> after {after['acc']:.1%} "
          f"({after['n']} questions, chance 25%; `telechat-ms {after['command']}`)")

    _banner("7/7 chat with the fine-tuned model, then serve it (OpenAI-compatible API, continuous batching)")
    import mindspore as ms
    ms.set_context(mode=ms.PYNATIVE_MODE)
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    from telechat_ms.model.telechat import TeleChatForCausalLM
    model = TeleChatForCausalLM.from_pretrained(result.final_dir)
    tok = TeleChatTokenizer.from_pretrained(result.final_dir)
    if not args.no_serve:
        serve_and_ask(result.final_dir)
    reply = answer(model, tok, CHECK[0])
    right = CHECK[1] in reply
    print(f"user: {CHECK[0]}\nbot:  {reply}  [{'right' if right else 'wrong'}]", flush=True)
    print(f"\ndemo finished in {time.time() - t0:.0f} s; everything is under {out}")
    return 0 if after["acc"] > before["acc"] and after["acc"] > 0.5 and right else 1


if __name__ == "__main__":
    sys.exit(main())
