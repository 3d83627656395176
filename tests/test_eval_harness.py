"""lm-eval 0.4.13 on a local task YAML over a fixture: `telechat-ms harness --model telechat_ms` on the MindSpore
checkpoint and `lm_eval --model hf` on its `convert ms2hf` export (trust_remote_code) give the same per-sample
log-likelihoods (1e-4) and the same accuracy; nothing reaches the hub (HF_HUB_OFFLINE=1).

The HF side runs one request at a time: lm-eval's HF model right-pads a batch, and TeleChat2's NTK tables follow the
sequence length, so past training_seqlen a padded HF row scores differently from the same row alone; telechat_ms
gives every row the tables of its own length, so its batch of 4 must equal HF's unpadded rows."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("torch")

from telechat_ms.cli import main  # noqa: E402

HERE = Path(__file__).parent
DATA = HERE / "eval_data"
MAX_LEN = 256
TASK_YAML = """task: tc_mini_mc
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
ROLLING_YAML = """task: tc_mini_rolling
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: word_perplexity
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from telechat_ms.data.train_tokenizer import train_tokenizer
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    root = tmp_path_factory.mktemp("harness")
    tok = train_tokenizer(str(root / "tok"), vocab_size=1024)
    src = str(root / "src")
    write_random_hf_checkpoint(src, tiny_config(vocab_size=tok.vocab_size, seq_length=MAX_LEN), qk_scale=4.0, seed=5)
    tok.save_pretrained(src)
    ms_dir, hf_dir = str(root / "ms"), str(root / "hf")
    assert main(["convert", "hf2ms", src, ms_dir, "--quiet"]) == 0
    assert main(["convert", "ms2hf", ms_dir, hf_dir, "--quiet"]) == 0
    # the export + a test-only AutoModelForCausalLM over the torch reference
    shutil.copy(HERE / "eval_harness" / "hf_ref_modeling.py", os.path.join(hf_dir, "hf_ref_modeling.py"))
    cfg_path = os.path.join(hf_dir, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["auto_map"]["AutoModelForCausalLM"] = "hf_ref_modeling.TelechatRefForCausalLM"
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in [
        ("How many planets are in the Solar System?", ["7", "8", "9", "10"], 1),
        ("Which is the largest planet?", ["Earth", "Neptune", "Jupiter", "Saturn"], 2),
        ("Which bone is the longest in the human body?", ["Femur", "Tibia", "Humerus"], 0),
        ("The sun rises in the", ["east", "west"], 0)]]
    data = root / "mini.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tc_mini_mc.yaml").write_text(TASK_YAML.format(data=data))
    (tasks / "tc_mini_rolling.yaml").write_text(ROLLING_YAML.format(data=data))
    return {"ms": ms_dir, "hf": hf_dir, "tasks": str(tasks), "root": root}


def _samples(out: str, task: str) -> list[dict]:
    files = glob.glob(os.path.join(out, "**", f"samples_{task}_*.jsonl"), recursive=True)
    assert len(files) == 1, files
    return sorted((json.loads(x) for x in open(files[0])), key=lambda s: s["doc_id"])


def _results(out: str) -> dict:
    files = glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True)
    return json.load(open(files[0]))["results"]


def test_harness_model_matches_lm_eval_hf_on_the_export(setup, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    common = ["--tasks", "tc_mini_mc,tc_mini_rolling", "--include_path", setup["tasks"], "--log_samples"]
    ours = str(setup["root"] / "ours")
    rc = main(["harness", "run", "--model", "telechat_ms",
               "--model_args", f"pretrained={setup['ms']},max_length={MAX_LEN}",
               "--output_path", ours, "--batch_size", "4", *common])
    assert rc == 0
    theirs = str(setup["root"] / "theirs")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent)] + sys.path))
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                           f"pretrained={setup['hf']},trust_remote_code=True,dtype=float32,max_length={MAX_LEN}",
                           "--device", "cpu", "--output_path", theirs, "--batch_size", "1", *common], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _samples(ours, "tc_mini_mc"), _samples(theirs, "tc_mini_mc")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x["arguments"] == y["arguments"]
        lx = [float(r[0][0]) for r in x["resps"]]
        ly = [float(r[0][0]) for r in y["resps"]]
        assert max(abs(p - q) for p, q in zip(lx, ly)) < 1e-4
        assert x["acc"] == y["acc"]
    ra, rb = _results(ours), _results(theirs)
    assert ra["tc_mini_mc"]["acc,none"] == rb["tc_mini_mc"]["acc,none"]
    pa, pb = _samples(ours, "tc_mini_rolling"), _samples(theirs, "tc_mini_rolling")
    for x, y in zip(pa, pb):
        assert abs(float(x["resps"][0][0]) - float(y["resps"][0][0])) < 1e-4
