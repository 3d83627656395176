"""GSM8K from its release (gsm8k/test.jsonl, gsm8k/train.jsonl), prompted as lm-eval 0.4.13's task `gsm8k`:
K shots drawn from train by random.Random(1234).sample per test question in order (lm-eval's default sampler and
seed), "Question: {q}\\nAnswer: {a}\\n\\n" each, then "Question: {q}\\nAnswer:"; greedy until "Question:", "</s>",
"<|im_end|>". Scores: exact match of the number after "#### " (strict) and of the last number (flexible), after
lm-eval's normalisation (drop ",", "$", a final "." and everything up to "#### "; case ignored)."""
from __future__ import annotations

import os
import random
import re
from typing import Any

from telechat_ms.eval.tasks.base import LayoutError, Metric, Sample, TaskSpec, mean_stderr, read_jsonl

LAYOUT = 'gsm8k/test.jsonl and gsm8k/train.jsonl, one {"question": str, "answer": str ending "#### <number>"} a line'
UNTIL = ("Question:", "</s>", "<|im_end|>")
FEWSHOT_SEED = 1234
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def load(data_dir: str, num_fewshot: int) -> list[Sample]:
    root = os.path.join(data_dir, "gsm8k")
    test = read_jsonl(os.path.join(root, "test.jsonl"), {"question": str, "answer": str}, LAYOUT)
    for doc in test:
        if "####" not in doc["answer"]:
            raise LayoutError(os.path.join(root, "test.jsonl"), "answer has no '#### <number>'", LAYOUT, doc["_line"])
    train = read_jsonl(os.path.join(root, "train.jsonl"), {"question": str, "answer": str}, LAYOUT) \
        if num_fewshot > 0 else []
    if len(train) < num_fewshot:
        raise LayoutError(os.path.join(root, "train.jsonl"), f"{len(train)} records, --num-fewshot asks "
                          f"{num_fewshot}", LAYOUT)
    rnd = random.Random(FEWSHOT_SEED)
    samples = []
    for i, doc in enumerate(test):
        shots = rnd.sample(train, num_fewshot) if num_fewshot else []
        prompt = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        prompt += f"Question: {doc['question']}\nAnswer:"
        samples.append(Sample("gsm8k", i, "", prompt, doc["answer"], until=UNTIL, max_gen_toks=256))
    return samples


def normalize(text: str) -> str:
    for pattern in _IGNORE:
        text = re.sub(pattern, "", text)
    return text.strip().lower()


def extract_strict(text: str) -> str | None:
    """The number after the first '#### '."""
    m = STRICT.search(text)
    return m.group(1) if m else None


def extract_flexible(text: str) -> str | None:
    """The last number in the text (lm-eval's flexible-extract: group_select -1)."""
    found = FLEXIBLE.findall(text)
    if not found:
        return None
    last = found[-1]
    return next(g for g in last if g) if isinstance(last, tuple) else last


def score(sample: Sample, result: dict[str, Any]) -> dict[str, Any]:
    gen = result["generation"]
    target = normalize(sample.target)
    strict, flexible = extract_strict(gen), extract_flexible(gen)
    return {"extracted": strict if strict is not None else flexible, "pred": flexible, "target": target,
            "correct": strict is not None and normalize(strict) == target,
            "correct_flexible": flexible is not None and normalize(flexible) == target}


def aggregate(samples: list[Sample], logs: list[dict[str, Any]]) -> list[Metric]:
    out = []
    for metric, key in (("exact_match,strict-match", "correct"), ("exact_match,flexible-extract", "correct_flexible")):
        m, se = mean_stderr([float(x[key]) for x in logs])
        out.append(Metric("gsm8k", metric, m, len(logs), se))
    return out


TASKS = [TaskSpec("gsm8k", "generate", load, score, aggregate, default_fewshot=5, published="GSM8K",
                  primary="exact_match,flexible-extract")]
