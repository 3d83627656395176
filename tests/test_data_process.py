"""process-data end to end: released sample mix with the real tokenizer, determinism across workers, bad lines."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.data_fixtures import (DEMO, REAL_TOKENIZER, REPO, SAMPLE, demo_tok, demo_tok_dir,  # noqa: F401
                                 require_shared, rewrite_mix)
from telechat_ms.data import ProcessOptions, process_data, read_mindrecord
from telechat_ms.cli import main as cli_main

MAX_LEN = 1024


def run(mix, tok, out, **kw) -> dict:
    return process_data(ProcessOptions(data_mix=str(mix), tokenizer=str(tok), out=str(out), progress=False, **kw),
                        log=lambda msg: None)


def files_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "manifest.json"}


@pytest.fixture(scope="module")
def sample_runs(tmp_path_factory):
    """The released SFT mix (40 records per file) processed with 1 and with 4 workers."""
    require_shared()
    tmp = tmp_path_factory.mktemp("sample")
    mix = rewrite_mix(SAMPLE / "sft_data_config.json", tmp)
    common = dict(max_seq_len=MAX_LEN, seed=42, max_records_per_file=40, records_per_shard=100)
    one = run(mix, REAL_TOKENIZER, tmp / "w1", num_workers=1, **common)
    four = run(mix, REAL_TOKENIZER, tmp / "w4", num_workers=4, **common)
    return tmp, one, four


def test_sample_mix_is_byte_identical_for_1_and_4_workers(sample_runs):
    tmp, one, four = sample_runs
    a, b = files_bytes(tmp / "w1"), files_bytes(tmp / "w4")
    assert len([n for n in a if n.endswith(".mindrecord")]) >= 2  # several shards
    assert a == b
    drop_time = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
    assert drop_time(one) == drop_time(four)


def test_sample_mix_rows_fit_and_are_labelled_correctly(sample_runs):
    tmp, summary, _ = sample_runs
    data = read_mindrecord(str(tmp / "w1"))
    ids, labels = data["input_ids"], data["labels"]
    assert ids.dtype == np.int32 and labels.dtype == np.int32
    assert ids.shape == labels.shape == (summary["sequences"], MAX_LEN)
    sup = labels != -100
    assert (labels[sup] == ids[sup]).all()
    assert not sup[ids == 3].any()  # padding never supervised
    assert int(sup.sum()) == summary["supervised_tokens"]
    assert int((ids != 3).sum()) == summary["tokens"]
    assert summary["records_read"] == 240 and summary["records_skipped"] == 0
    assert summary["truncated"] > 0  # long multi-turn / tool records at 1024 tokens: counted, not silent
    assert summary["packed_records"] > 0
    manifest = json.loads((tmp / "w1" / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == "db947024849f75ec4bd9af5d4c84fa71e96a26971eb353a70acd66194fc7a69b"
    assert manifest["counts"]["sequences"] == summary["sequences"]
    assert [m["weight"] for m in manifest["mix"]] == [1.01, 1.24, 1.78, 1.42, 1.2, 1.0]
    assert [m["records_selected"] for m in manifest["mix"]] == [40, 50, 71, 57, 48, 40]
    assert sum(s["records"] for s in manifest["shards"]) == summary["sequences"]


def test_pretrain_mix_all_tokens_supervised(tmp_path):
    require_shared()
    mix = rewrite_mix(SAMPLE / "pretrain_data_config.json", tmp_path)
    summary = run(mix, REAL_TOKENIZER, tmp_path / "out", task="pretrain", max_seq_len=2048, num_workers=1)
    data = read_mindrecord(str(tmp_path / "out"))
    assert summary["records_read"] == 20 and summary["tokens"] == summary["supervised_tokens"]
    assert ((data["labels"] != -100) == (data["input_ids"] != 3)).all()


BAD = [
    "{broken json",
    json.dumps({"system": "s", "dialog": []}),
    json.dumps({"system": "s"}),
    json.dumps({"system": "s", "dialog": [{"role": "alien", "content": "x"}, {"role": "bot", "content": "y"}]}),
    json.dumps({"system": "s", "dialog": [{"role": "user", "content": "only a question"}]}),
]


def write_bad_file(tmp_path: Path) -> tuple[Path, Path]:
    good = [json.dumps({"system": "SYS\n", "dialog": [{"role": "user", "content": f"q{i}"},
                                                       {"role": "bot", "content": f"a{i}"}]}) for i in range(6)]
    lines = good[:2] + [BAD[0], "", BAD[1]] + good[2:4] + BAD[2:] + good[4:]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"bad.jsonl": 1}))
    return data, mix


def test_bad_lines_are_reported_with_file_line_and_counted(tmp_path, demo_tok_dir, capsys):
    data, mix = write_bad_file(tmp_path)
    code = cli_main(["process-data", "--data-mix", str(mix), "--tokenizer", str(demo_tok_dir), "--out",
                     str(tmp_path / "out"), "--max-seq-len", "128", "--num-workers", "1", "--no-progress",
                     "--show-errors", "10"])
    assert code == 0
    err = capsys.readouterr()
    expected = {3: "invalid JSON", 5: "dialog: empty", 8: "missing field 'dialog'", 9: "unknown role",
                10: "must end with a bot turn"}
    for line_no, reason in expected.items():
        assert f"{data}:{line_no}: " in err.err and reason in err.err
    assert "5 skipped" in err.out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["records_skipped"] == 5 and manifest["counts"]["records_valid"] == 6
    assert [e.split(": ")[0] for e in manifest["first_errors"]] == [f"{data}:{n}" for n in expected]
    listed = (tmp_path / "out" / "skipped_lines.txt").read_text().splitlines()
    assert listed == manifest["first_errors"]


def test_on_error_fail_exits_non_zero_and_writes_nothing(tmp_path, demo_tok_dir, capsys):
    data, mix = write_bad_file(tmp_path)
    out = tmp_path / "out"
    code = cli_main(["process-data", "--data-mix", str(mix), "--tokenizer", str(demo_tok_dir), "--out", str(out),
                     "--num-workers", "2", "--on-error", "fail", "--no-progress"])
    assert code != 0
    assert f"{data}:3: invalid JSON" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_existing_output_is_not_overwritten_without_flag(tmp_path, demo_tok_dir):
    _, mix = write_bad_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli_main(["process-data", "--data-mix", str(mix), "--tokenizer", str(demo_tok_dir), "--out", str(out),
                     "--no-progress"]) != 0
    assert (out / "keep.txt").read_text() == "x"


def test_demo_data_via_module_cli_with_boundaries_and_dataset(tmp_path, demo_tok_dir):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "telechat_ms.cli", "process-data", "--data-mix", str(DEMO / "demo_mix.json"),
           "--tokenizer", str(demo_tok_dir), "--out", str(out), "--max-seq-len", "512", "--num-workers", "2",
           "--no-cross-attention", "--pad-side", "left", "--loss-mask", "answer-only", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "records: 200 read, 0 skipped" in proc.stdout
    data = read_mindrecord(str(out))
    assert set(data) == {"input_ids", "labels", "position_ids"}
    pos, ids = data["position_ids"], data["input_ids"]
    assert pos.shape == ids.shape and (pos[:, 0] == 0).all()
    assert (ids[:, -1] != 3).all()  # left padding: real tokens end every row
    from telechat_ms.train.loader import BatchLoader  # the trainer's reader of the shards
    batch = BatchLoader(str(out), batch_size=4, seed=1).next_global_batch()[0][0]
    assert batch["input_ids"].shape == (4, 512) and batch["position_ids"].dtype == np.int32


def test_bom_crlf_and_non_utf8_lines(tmp_path, demo_tok_dir):
    good = json.dumps({"input": "q", "output": "a"}).encode()
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\r\n" + b"\xff\xfe bad\r\n\r\n" + good + b"\r\n")
    messages = []
    summary = process_data(ProcessOptions(data_mix=str(tmp_path / "d.jsonl"), tokenizer=str(demo_tok_dir),
                                          out=str(tmp_path / "out"), max_seq_len=128, progress=False),
                           log=messages.append)
    assert (summary["records_read"], summary["records_skipped"], summary["records_valid"]) == (3, 1, 2)
    assert messages == [f"skipped {tmp_path / 'd.jsonl'}:2: not UTF-8 text (byte 0)"]
