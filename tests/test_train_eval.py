"""Held-out loss: heldout_loss against the torch reference, eval while training (do_eval) at its interval and equal to
heldout_loss on the saved checkpoint, the best checkpoint, resume of the eval schedule, the YAML keys' errors, and
`process-data --eval-fraction`'s seeded disjoint split."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from telechat_ms.errors import ConfigError, DataError
from telechat_ms.job_config import job_from_dict, load_job_config
from tests.train_helpers import tiny_job, write_yaml

torch = pytest.importorskip("torch")


def _records(path, n: int = 60) -> str:
    """n SFT records with distinct texts (so a record can be recognised by its tokens)."""
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"input": f"question number {i}: what is {i} plus {i}?",
                                 "output": f"{i} plus {i} is {2 * i}."}) + "\n")
    return str(path)


def test_heldout_loss_matches_the_torch_reference(demo_data, tmp_path, pynative_after):
    """Token-mean NLL of every record (a partial last batch included) = the torch reference's cross entropy over
    the same padded rows; max_steps reads only the first batches."""
    import mindspore as ms
    from telechat_ms.data.mindrecord import read_mindrecord
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    from telechat_ms.reference.torch_model import TeleChatRef
    from telechat_ms.train.evaluate import heldout_loss

    ms.set_context(mode=ms.PYNATIVE_MODE)  # the forward compiles itself (ms.jit)
    hf_dir = write_random_hf_checkpoint(str(tmp_path / "hf"), tiny_config(vocab_size=demo_data["vocab_size"],
                                                                          seq_length=64), seed=5)
    model = TeleChatForCausalLM.from_pretrained(hf_dir)
    rows = read_mindrecord(demo_data["data"])
    n = len(rows["input_ids"])
    assert n % 7 != 0  # batch 7: the last batch is completed with ignored rows
    got = heldout_loss(model, demo_data["data"], batch_size=7)

    ref = TeleChatRef.from_pretrained(hf_dir)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, 16):
            ids = torch.from_numpy(rows["input_ids"][start:start + 16].astype(np.int64))
            labels = torch.from_numpy(rows["labels"][start:start + 16].astype(np.int64))
            logits = ref(ids).logits
            nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                                           labels[:, 1:].reshape(-1), ignore_index=-100,
                                                           reduction="sum"))
            count += int((labels[:, 1:] != -100).sum())
    assert got["tokens"] == count and got["rows"] == n and got["steps"] == -(-n // 7)
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(np.exp(nll / count), rel=1e-5)

    first = heldout_loss(model, demo_data["data"], batch_size=4, max_steps=2)
    sub = rows["labels"][:8, 1:]
    assert first["rows"] == 8 and first["steps"] == 2 and first["tokens"] == int((sub != -100).sum())


def test_data_parallel_ranks_cover_every_record_once(demo_data, pynative_after):
    """Ranks of a world of 3 read disjoint rows whose sums add up to the single process's (the AllReduce adds
    exactly these), the ignored filler rows included."""
    import mindspore as ms
    from telechat_ms.config import TeleChatConfig
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.train.evaluate import HeldoutEvaluator

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(3)
    model = TeleChatForCausalLM(TeleChatConfig.preset("tiny", hidden_size=64, n_head=4, num_key_value_heads=2,
                                                      ffn_hidden_size=96, vocab_size=demo_data["vocab_size"],
                                                      training_seqlen=32, base_seqlen=32))
    whole = HeldoutEvaluator(model, demo_data["data"], 6).local_sums()
    parts = [HeldoutEvaluator(model, demo_data["data"], 2, rank=r, world_size=3) for r in range(3)]
    sums = [p.local_sums() for p in parts]
    assert sum(c for _, c in sums) == whole[1]
    assert sum(s for s, _ in sums) == pytest.approx(whole[0], rel=1e-6)
    assert parts[0].steps() == parts[2].steps() == HeldoutEvaluator(model, demo_data["data"], 6).steps()


def _eval_records(out_dir: str) -> dict[int, dict]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return {r["step"]: r for r in map(json.loads, fh) if "eval_loss" in r}


def test_do_eval_logs_at_the_interval_and_equals_heldout_loss(demo_data, tmp_path, pynative_after):
    """Eval after steps 4, 8, 12; each value = heldout_loss of that step's checkpoint on the same data (1e-5);
    checkpoints/best/ holds the lowest one and survives keep_checkpoint_max; the loss curve and TensorBoard get
    it."""
    import mindspore as ms
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.checkpoint_io import assign_from_safetensors
    from telechat_ms.train.evaluate import heldout_loss
    from telechat_ms.train.trainer import train

    out = str(tmp_path / "run")
    job = job_from_dict(tiny_job(demo_data["data"], out, demo_data["vocab_size"], do_eval=True,
                                 eval_dataset={"data_dir": demo_data["data"], "batch_size": 6},
                                 eval_step_interval=4, eval_max_steps=20,
                                 runner_config={"batch_size": 4, "max_steps": 12},
                                 callbacks={"save_interval": 4, "keep_checkpoint_max": 2, "tensorboard": True,
                                            "loss_curve": True, "log_interval": 4}))
    result = train(job)
    records = _eval_records(out)
    assert sorted(records) == sorted(result.eval_losses) == [4, 8, 12]
    best_step = min(records, key=lambda s: records[s]["eval_loss"])
    assert all(r["eval_tokens"] > 0 and r["eval_perplexity"] == pytest.approx(np.exp(r["eval_loss"]))
               for r in records.values())
    assert records[12]["eval_best_step"] == best_step
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ckpts == ["best", "step_00000008", "step_00000012"]  # step 4 rotated away, best kept

    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = TeleChatForCausalLM.from_pretrained(result.final_dir)
    params = {p.name: p for p in model.get_parameters()}
    assign_from_safetensors(os.path.join(out, "checkpoints", "step_00000008", "model.safetensors"), params, "model")
    again = heldout_loss(model, demo_data["data"], batch_size=6, max_steps=20)
    assert abs(again["loss"] - records[8]["eval_loss"]) < 1e-5
    assert again["tokens"] == records[8]["eval_tokens"]

    # `telechat-ms eval --tasks perplexity` on the best checkpoint (a model directory) gives the logged value
    from telechat_ms.cli import main
    state = json.load(open(os.path.join(out, "checkpoints", "best", "eval_state.json"), encoding="utf-8"))
    assert state["step"] == best_step and result.best_dir.endswith("best")
    assert main(["eval", result.best_dir, "--tasks", "perplexity", "--data-dir", demo_data["data"], "--batch-size",
                 "6", "--limit", "20", "--output", str(tmp_path / "ppl"), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "ppl" / "results.json").read_text())["results"]
    loss = next(r for r in rows if r["metric"] == "loss")
    assert abs(loss["value"] - records[best_step]["eval_loss"]) < 1e-5 and loss["n"] == records[best_step]["eval_tokens"]
    assert os.path.isfile(os.path.join(out, "loss_curve.png"))
    assert any(name.startswith("events") for name in os.listdir(os.path.join(out, "tensorboard")))


def test_resume_continues_the_eval_schedule_and_the_best_value(demo_data, tmp_path, pynative_after):
    """A run resumed from step 6's checkpoint logs the same eval losses at 9 and 12 (bitwise on CPU) and ends with
    the same best value and step as the run that went straight through."""
    from telechat_ms.train.trainer import train

    def job(out: str, **extra) -> dict:
        return tiny_job(demo_data["data"], out, demo_data["vocab_size"], do_eval=True,
                        eval_dataset={"data_dir": demo_data["data"], "batch_size": 8}, eval_step_interval=3,
                        eval_max_steps=6, runner_config={"batch_size": 4, "max_steps": 12},
                        callbacks={"save_interval": 6, "keep_checkpoint_max": 3, "tensorboard": False,
                                   "loss_curve": False}, **extra)

    full = train(job_from_dict(job(str(tmp_path / "full"))))
    os.makedirs(tmp_path / "resumed" / "checkpoints")
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000006",
                    tmp_path / "resumed" / "checkpoints" / "step_00000006")  # what a run killed after step 6 left
    resumed = train(job_from_dict(job(str(tmp_path / "resumed"), resume="auto")))
    assert sorted(resumed.eval_losses) == [9, 12]
    a, b = _eval_records(str(tmp_path / "full")), _eval_records(str(tmp_path / "resumed"))
    for step in (9, 12):
        for key in ("eval_loss", "eval_tokens", "eval_best_loss", "eval_best_step"):
            assert a[step][key] == b[step][key], (step, key)
    state = json.load(open(tmp_path / "full" / "checkpoints" / "step_00000012" / "trainer_state.json"))
    assert state["eval"] == json.load(open(tmp_path / "resumed" / "checkpoints" / "step_00000012" /
                                           "trainer_state.json"))["eval"]
    assert state["eval"]["best_loss"] == min(full.eval_losses.values())


@pytest.mark.parametrize("extra,message", [
    ({"do_eval": True}, r"job.yaml:\d+: 'do_eval': do_eval needs an eval_dataset section"),
    ({"eval_dataset": {"data_dir": "x"}}, r"job.yaml:\d+: 'eval_dataset' has no effect without do_eval: true"),
    ({"eval_step_interval": 5}, r"'eval_step_interval' has no effect without do_eval"),
    ({"do_eval": True, "eval_dataset": {"data_dir": "x"}, "eval_max_steps": 0}, r"'eval_max_steps' must be > 0"),
    ({"do_eval": True, "eval_dataset": {"data_dir": "x"}, "eval_step_interval": 0},
     r"needs eval_step_interval > 0 or eval_epoch_interval > 0"),
    ({"do_eval": True, "eval_dataset": {"data_dir": "x", "shuffle": False}},
     r"job.yaml:\d+: 'eval_dataset.shuffle': unknown key"),
    ({"do_eval": True, "eval_dataset": {"data_dir": "x", "batch_size": -1}}, r"'eval_dataset.batch_size' must be"),
    ({"do_eval": True, "eval_dataset": {"data_dir": "x"}, "parallel": {"parallel_mode": "semi_auto_parallel"}},
     r"'do_eval': eval while training runs under stand_alone and data_parallel"),
])
def test_eval_keys_are_checked_with_file_and_line(tmp_path, extra, message):
    path = write_yaml(str(tmp_path / "job.yaml"), tiny_job("data", "out", 256, **extra))
    with pytest.raises(ConfigError, match=message):
        load_job_config(path)


def test_eval_schedule_by_epoch(demo_data):
    """eval_epoch_interval: after the last step of every N-th epoch (MindFormers' EvalCallBack)."""
    from telechat_ms.train.evaluate import TrainingEval
    job = job_from_dict(tiny_job(demo_data["data"], "out", demo_data["vocab_size"], do_eval=True,
                                 eval_dataset={"data_dir": demo_data["data"]}, eval_step_interval=0,
                                 eval_epoch_interval=2))
    sched = TrainingEval.__new__(TrainingEval)
    sched.step_interval, sched.epoch_interval, sched.batches_per_epoch = 0, job.eval_epoch_interval, 5
    assert [s for s in range(1, 31) if sched.due(s)] == [10, 20, 30]
    sched.step_interval = 4
    assert [s for s in range(1, 21) if sched.due(s)] == [4, 8, 10, 12, 16, 20]


def test_eval_fraction_writes_a_seeded_disjoint_split(demo_data, tmp_path):
    """Every record lands in exactly one half; the draw is fixed by the seed (not by parts or workers); both halves
    have manifests that name the split; another seed draws another split."""
    from telechat_ms.data.mindrecord import read_manifest, read_mindrecord
    from telechat_ms.data.process import ProcessOptions, process_data
    from telechat_ms.data.tokenizer import TeleChatTokenizer

    src = _records(tmp_path / "r.jsonl")
    tok = TeleChatTokenizer.from_pretrained(demo_data["tokenizer"])

    def split(out: str, seed: int = 42, **kw) -> tuple[list[str], list[str]]:
        summary = process_data(ProcessOptions(data_mix=src, tokenizer=demo_data["tokenizer"], out=out,
                                              max_seq_len=64, pack=False, progress=False, seed=seed,
                                              eval_fraction=0.25, **kw))
        assert summary["eval"]["out"] == out + "_eval"
        halves = []
        for d in (out, out + "_eval"):
            rows = read_mindrecord(d, pad=False)["input_ids"]
            halves.append(sorted(tok.decode([int(t) for t in r]) for r in rows))
        return halves[0], halves[1]

    train, held = split(str(tmp_path / "a"))
    texts = [f"question number {i}:" for i in range(60)]
    owner = [[t for t in texts if any(t in r for r in half)] for half in (train, held)]
    assert sorted(owner[0] + owner[1]) == sorted(texts) and not set(owner[0]) & set(owner[1])
    assert 5 <= len(held) <= 25 and len(train) + len(held) == 60
    m_train, m_eval = read_manifest(str(tmp_path / "a")), read_manifest(str(tmp_path / "a_eval"))
    assert m_train["split"]["name"] == "train" and m_eval["split"]["name"] == "eval"
    assert m_eval["split"]["eval_fraction"] == 0.25 and m_eval["counts"]["sequences"] == len(held)
    assert split(str(tmp_path / "b"), part_size_mb=0.001) == (train, held)  # cut into many parts
    assert split(str(tmp_path / "c"), seed=7)[1] != held
    with pytest.raises(DataError, match="--eval-fraction must be in"):
        process_data(ProcessOptions(data_mix=src, tokenizer=demo_data["tokenizer"], out=str(tmp_path / "d"),
                                    eval_fraction=1.0, progress=False))


def test_prompt_completion_records_supervise_the_completion_only(demo_data, tmp_path):
    """Pretrain {"prompt", "completion"} records (TRL's prompt-completion format, plain text): only the completion
    and <_end> are supervised, a record is never cut across rows, and a missing field names its file and line."""
    from telechat_ms.data.mindrecord import read_mindrecord
    from telechat_ms.data.process import ProcessOptions, process_data
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    tok = TeleChatTokenizer.from_pretrained(demo_data["tokenizer"])
    src = tmp_path / "pc.jsonl"
    records = [{"prompt": f"Question {i}: how many legs has a cat?\nAnswer:", "completion": f" {i % 4 + 1}"}
               for i in range(40)]
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    process_data(ProcessOptions(data_mix=str(src), tokenizer=demo_data["tokenizer"], out=str(tmp_path / "o"),
                                max_seq_len=64, task="pretrain", progress=False))
    rows = read_mindrecord(str(tmp_path / "o"), pad=False)
    seen = 0
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        text = tok.decode([int(t) for t in ids])
        assert text.startswith("Question ") and text.endswith("<_end>")      # whole records only
        supervised = [int(t) for t, y in zip(ids, labels) if y != -100]
        pieces = [tok.decode([t]) for t in supervised]
        seen += text.count("<_end>")
        assert re.fullmatch(r"([1-4]<_end>)+", "".join(pieces)) and "".join(pieces).count("<_end>") == \
            text.count("<_end>"), pieces   # " 3" is "▁" + "3" for this tokenizer: both supervised
    assert seen == 40
    # in the SFT task too (one mix with chat turns): plain text, no chat template around it, one record per row
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"input": "hi", "output": "hello"}) + "\n", encoding="utf-8")
    (tmp_path / "mix.json").write_text(json.dumps({"pc.jsonl": 1, "chat.jsonl": 1}), encoding="utf-8")
    process_data(ProcessOptions(data_mix=str(tmp_path / "mix.json"), tokenizer=demo_data["tokenizer"],
                                out=str(tmp_path / "s"), max_seq_len=64, pack=False, progress=False))
    texts = [tok.decode([int(t) for t in r]) for r in read_mindrecord(str(tmp_path / "s"), pad=False)["input_ids"]]
    assert len(texts) == 41 and sum(t.startswith("Question ") and "<_user>" not in t for t in texts) == 40
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'completion'"):
        process_data(ProcessOptions(data_mix=str(tmp_path / "bad.jsonl"), tokenizer=demo_data["tokenizer"],
                                    out=str(tmp_path / "b"), task="pretrain", on_error="fail", progress=False))


def test_the_demo_task_holds_out_its_exam_questions(tmp_path):
    """The demo's held-out exam (a C-Eval val CSV) shares no prompt with the practice records, asks every practised
    fact, and balances its answer letters (an untrained model's preference for one letter scores 25%)."""
    import csv
    from collections import Counter
    from telechat_ms.data.demo_exam import write_heldout_records, write_task
    paths = write_task(str(tmp_path))
    practice = [json.loads(line) for line in open(paths["practice"], encoding="utf-8")]
    held = [json.loads(line) for line in open(write_heldout_records(paths["ceval"], str(tmp_path / "h.jsonl")),
                                              encoding="utf-8")]
    with open(paths["ceval"], encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["id", "question", "A", "B", "C", "D", "answer"]
    assert not {r["prompt"] for r in practice} & {r["prompt"] for r in held}
    assert {r["completion"] for r in held} == {" A", " B", " C", " D"}
    assert set(Counter(r["answer"] for r in rows).values()) == {len(rows) // 4}
    answers = {(r["A"], r["B"], r["C"], r["D"], r["answer"]) for r in rows}
    practised = {tuple(line.split(". ", 1)[1] for line in r["prompt"].splitlines()[3:7]) + (r["completion"][1],)
                 for r in practice}
    assert answers == practised
