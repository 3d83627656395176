"""Benchmark loaders over fixtures in each official layout (tests/eval_data, our own text), the errors broken files
give, the prompts against lm-eval 0.4.13's own tasks built from its YAMLs over the same data, answer extraction and
the code sandbox."""
from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from telechat_ms.eval.sandbox import run_program, run_programs
from telechat_ms.eval.tasks import TASKS, LayoutError
from telechat_ms.eval.tasks import bbh, code, gsm8k

DATA = Path(__file__).parent / "eval_data"
EXPECTED = {"ceval": 4, "mmlu": 3, "cmmlu": 2, "gsm8k": 2, "bbh": 3, "humaneval": 2, "mbpp": 2, "ifeval": 2,
            "mt_bench": 2, "alignbench": 1}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loaders_read_the_official_layouts(name):
    spec = TASKS[name]
    samples = spec.load(str(DATA), min(spec.default_fewshot, 2))
    assert len(samples) == EXPECTED[name]
    assert [s.doc_id for s in samples] == list(range(len(samples)))
    assert all(s.task == name and s.prompt for s in samples)


def test_multiple_choice_targets_and_subjects():
    samples = TASKS["ceval"].load(str(DATA), 0)
    assert [(s.subject, s.target) for s in samples] == [("computer_network", 1), ("computer_network", 2),
                                                       ("computer_network", 0), ("logic", 0)]
    assert samples[2].prompt.endswith('DNS的作用是"域名解析"吗？\nA. 是\nB. 否\nC. 不确定\nD. 都不对\n'
                                      '答案：')
    assert samples[0].choices == [" A", " B", " C", " D"]
    mbpp = TASKS["mbpp"].load(str(DATA), 3)
    assert [s.doc["task_id"] for s in mbpp] == [11, 12]        # test split only; 2-4 are the shots
    assert mbpp[0].prompt.count("[DONE]") == 3


def _copy(tmp_path: Path, task: str) -> Path:
    shutil.copytree(DATA / task, tmp_path / task)
    return tmp_path


@pytest.mark.parametrize("task,rel,content,needle", [
    ("ceval", "ceval/val/logic_val.csv", "id,question,A,B,C\n0,q,a,b,c\n", "logic_val.csv:1: header"),
    ("ceval", "ceval/val/logic_val.csv", "id,question,A,B,C,D,answer\n0,q,a,b,c,d,E\n", "logic_val.csv:2: answer 'E'"),
    ("mmlu", "mmlu/data/test/anatomy_test.csv", "only,three,cols\n", "anatomy_test.csv:1: 3 columns"),
    ("cmmlu", "cmmlu/test/agronomy.csv", ",Question,A,B,C,D,Answer\n0,q,a,b\n", "agronomy.csv:2: 4 columns"),
    ("gsm8k", "gsm8k/test.jsonl", '{"question": "q", "answer": "a\\n#### 1"}\n{"question": "q"\n',
     "test.jsonl:2: not JSON"),
    ("gsm8k", "gsm8k/test.jsonl", '{"question": "q", "answer": "no marker"}\n', "test.jsonl:1: answer has no '####"),
    ("mbpp", "mbpp/mbpp.jsonl", '{"task_id": 11, "text": "t", "code": "c"}\n',
     "mbpp.jsonl:1: field 'test_list' is missing"),
    ("ifeval", "ifeval/input_data.jsonl", '{"key": 1, "prompt": 5, "instruction_id_list": [], "kwargs": []}\n',
     "input_data.jsonl:1: field 'prompt' is a int, expected str"),
    ("bbh", "bbh/bbh/date_understanding.json", '{"samples": []}', "date_understanding.json:1: no 'examples'"),
])
def test_broken_files_name_path_line_and_layout(tmp_path, task, rel, content, needle):
    root = _copy(tmp_path, task)
    (root / rel).write_text(content, encoding="utf-8")
    with pytest.raises(LayoutError) as err:
        TASKS[task].load(str(root), 0 if task != "gsm8k" else 0)
    assert needle in str(err.value) and "expected layout:" in str(err.value)


def test_a_missing_file_names_it(tmp_path):
    _copy(tmp_path, "bbh")
    os.remove(tmp_path / "bbh" / "cot-prompts" / "boolean_expressions.txt")
    with pytest.raises(LayoutError, match=r"boolean_expressions.txt: file not found"):
        TASKS["bbh"].load(str(tmp_path), 3)
    with pytest.raises(LayoutError, match=r"humaneval/HumanEval.jsonl.gz: file not found"):
        TASKS["humaneval"].load(str(tmp_path), 0)


# ---------------------------------------------------------------------- the prompts lm-eval builds
def _lm_eval_task(yaml_rel: str, files: dict[str, str], **extra):
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import lm_eval.tasks as lm_tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml
    cfg = load_yaml(os.path.join(os.path.dirname(lm_tasks.__file__), yaml_rel), resolve_func=True)
    cfg.pop("include", None)
    cfg.update({"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files}}, **extra)
    task = ConfigurableTask(config=cfg)
    task.set_fewshot_seed(1234)          # lm-eval's default fewshot seed
    return task


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _csv_rows(path: Path, cols: list[str]) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [{c: r[c] for c in cols} for r in csv.DictReader(fh)]


@pytest.mark.parametrize("family,yaml_rel,subject,cols", [
    ("ceval", "ceval/ceval-valid_computer_network.yaml", "computer_network",
     ["id", "question", "A", "B", "C", "D", "answer"]),
    ("cmmlu", "cmmlu/cmmlu_agronomy.yaml", "agronomy", ["Question", "A", "B", "C", "D", "Answer"]),
    ("mmlu", "mmlu/default/mmlu_astronomy.yaml", "astronomy", None),
])
def test_exam_prompts_equal_lm_eval_tasks(tmp_path, family, yaml_rel, subject, cols):
    from telechat_ms.eval.tasks.exams import _FAMILY, _rows
    split, dev, suffix, dev_suffix = _FAMILY[family][:4]
    root = DATA / family
    if cols is None:           # MMLU's HF dataset: question, choices, answer index
        def conv(p):
            return [{"question": r["question"], "subject": subject, "choices": [r[x] for x in "ABCD"],
                     "answer": "ABCD".index(r["answer"])} for r in _rows(str(p), "mmlu")]
        ev, fs = conv(root / split / f"{subject}{suffix}"), conv(root / dev / f"{subject}{dev_suffix}")
    else:
        ev = _csv_rows(root / split / f"{subject}{suffix}", cols)
        fs = _csv_rows(root / dev / f"{subject}{dev_suffix}", cols)
    split_name = {"ceval": "val", "cmmlu": "test", "mmlu": "test"}[family]
    task = _lm_eval_task(yaml_rel, {split_name: _jsonl(tmp_path / "e.jsonl", ev),
                                    "dev": _jsonl(tmp_path / "d.jsonl", fs)})
    ours = [s for s in TASKS[family].load(str(DATA), 2) if s.subject == subject]
    docs = list(task.eval_docs)
    assert len(docs) == len(ours)
    for doc, sample in zip(docs, ours):
        ctx = task.fewshot_context(doc, 2)
        assert ctx == sample.prompt
        reqs = task.construct_requests(doc, ctx, metadata=(family, 0, 1))
        assert [r.arguments for r in reqs] == [(sample.prompt, c) for c in sample.choices]
        assert task.doc_to_target(doc) == sample.target


def test_gsm8k_prompts_and_shots_equal_lm_eval(tmp_path):
    files = {"test": str(DATA / "gsm8k" / "test.jsonl"), "train": str(DATA / "gsm8k" / "train.jsonl")}
    task = _lm_eval_task("gsm8k/gsm8k.yaml", files)
    ours = TASKS["gsm8k"].load(str(DATA), 3)
    for doc, sample in zip(task.eval_docs, ours):     # one sampler drawn in doc order, as lm-eval does
        assert task.fewshot_context(doc, 3) == sample.prompt
    assert tuple(task.config.generation_kwargs["until"]) == gsm8k.UNTIL


def test_bbh_prompt_from_the_release_files_equals_lm_eval(tmp_path):
    """The cot-prompts file in the release layout, written from lm-eval's own shots, gives lm-eval's prompt."""
    import lm_eval.tasks as lm_tasks
    from lm_eval.tasks._yaml_loader import load_yaml
    cfg = load_yaml(os.path.join(os.path.dirname(lm_tasks.__file__), "bbh/cot_fewshot/boolean_expressions.yaml"),
                    resolve_func=True)
    shots = cfg["fewshot_config"]["samples"]
    root = tmp_path / "bbh"
    (root / "bbh").mkdir(parents=True)
    (root / "cot-prompts").mkdir()
    examples = [{"input": "not ( True ) and ( True ) is", "target": "False"}]
    (root / "bbh" / "boolean_expressions.json").write_text(json.dumps({"examples": examples}))
    text = cfg["description"].strip() + "\n\n" + "\n\n".join(
        f"Q: {s['input']}\nA: Let's think step by step.\n{s['target']}" for s in shots)
    (root / "cot-prompts" / "boolean_expressions.txt").write_text("-----\n" + text + "\n")
    task = _lm_eval_task("bbh/cot_fewshot/boolean_expressions.yaml",
                         {"test": _jsonl(tmp_path / "t.jsonl", examples)})
    ours = TASKS["bbh"].load(str(tmp_path), 3)
    assert task.fewshot_context(next(iter(task.eval_docs)), 3) == ours[0].prompt
    assert tuple(task.config.generation_kwargs["until"]) == bbh.UNTIL


# ---------------------------------------------------------------------- answer extraction
@pytest.mark.parametrize("text,strict,flexible", [
    ("5 + 4 = 9\n#### 9", "9", "9"),
    ("They sell 1,200 * 2 = 2,400 cups.\n#### 2,400\n", "2,400", "2,400"),
    ("The answer is 42.", None, "42."),
    ("no number here", None, None),
])
def test_gsm8k_extraction(text, strict, flexible):
    assert gsm8k.extract_strict(text) == strict
    assert gsm8k.extract_flexible(text) == flexible


def test_gsm8k_scoring_normalises_as_lm_eval():
    sample = TASKS["gsm8k"].load(str(DATA), 0)[1]          # target 2,400
    assert gsm8k.score(sample, {"generation": " 2400 cups\n#### 2,400"})["correct"]
    wrong = gsm8k.score(sample, {"generation": " 2 * 1200 = 2400. So 2400 cups."})
    assert not wrong["correct"] and wrong["correct_flexible"]      # flexible reads the last number
    assert not gsm8k.score(sample, {"generation": "#### 24"})["correct"]


def test_bbh_and_code_extraction():
    assert bbh.extract("2 = False. So the answer is False.") == "False"
    assert bbh.extract("So the answer is (A).") == "(A)"
    assert bbh.extract("I do not know") is None
    assert code.code_block("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1"
    assert code.code_block("    return a + b\n") == "    return a + b\n"


# ---------------------------------------------------------------------- the sandbox
def test_sandbox_right_passes_wrong_fails_loop_and_memory_bomb_are_stopped():
    he = TASKS["humaneval"].load(str(DATA), 0)[0]
    right = code.program(he, "    return a + b\n")[1]
    wrong = code.program(he, "    return a * b\n")[1]
    loop = code.program(he, "    while True:\n        pass\n")[1]
    bomb = code.program(he, "    x = bytearray(8 * 1024 ** 3)\n    return a + b\n")[1]
    fork = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nwhile True:\n    pass\n"
    start = time.perf_counter()
    results = run_programs([right, wrong, loop, bomb, fork, right], timeout=2.0, memory_mb=512, workers=3)
    elapsed = time.perf_counter() - start
    assert [r.status for r in results] == ["passed", "failed", "timeout", "memory", "timeout", "passed"]
    assert "AssertionError" in results[1].output
    assert elapsed < 15, elapsed               # every program was stopped within its limits


def test_sandbox_runs_in_a_fresh_temporary_directory():
    res = run_program("import os\nprint(os.getcwd())\nopen('x.txt', 'w').write('hi')\n", timeout=5)
    assert res.passed
    cwd = res.output.strip()
    assert "telechat-sandbox-" in cwd and not os.path.exists(cwd)


def test_nothing_below_eval_imports_it():
    """ARCHITECTURE: eval/ sits beside serve/ (it drives the engine); only the CLI imports it."""
    from tests.test_architecture import _graph
    graph = _graph()
    users = sorted(m for m, deps in graph.items() if any(d.startswith("telechat_ms.eval") for d in deps)
                   and not m.startswith(("telechat_ms.eval", "telechat_ms.commands", "telechat_ms.cli")))
    assert users == []
    assert not any(d.startswith(("telechat_ms.commands", "telechat_ms.cli")) for m, deps in graph.items()
                   if m.startswith("telechat_ms.eval") for d in deps)
