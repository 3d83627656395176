"""process-data at corpus scale: parts from the pre-pass, byte-identical output for any worker count and node split,
pretrain chunking without loss, the slot fill of isolated packing, resume after kill -9, file:line across parts."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.data_fixtures import (DEMO, REAL_TOKENIZER, REPO, SAMPLE, SFT_FILES, demo_tok, demo_tok_dir,  # noqa: F401
                                 require_shared)
from telechat_ms.cli import main as cli_main
from telechat_ms.data import ProcessOptions, process_data, read_mindrecord
from telechat_ms.data.mix import MixEntry, extra_in_part, part_quotas
from telechat_ms.data.parts import iter_lines, plan_parts
from telechat_ms.errors import DataError


def run(mix, tok, out, **kw) -> dict:
    return process_data(ProcessOptions(data_mix=str(mix), tokenizer=str(tok), out=str(out), progress=False, **kw),
                        log=lambda msg: None)


def digests(directory: Path) -> dict[str, str]:
    """sha256 of every output file but the manifest (whose options record the worker / node counts)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.name != "manifest.json"}


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def test_prepass_parts_are_line_aligned_and_cover_every_record(tmp_path):
    lines = [json.dumps({"text": "x" * (i * 37 % 500 + 1)}) for i in range(300)]
    lines[10] = lines[50] = "   "  # blank lines are not records but keep their line numbers
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    mix = [MixEntry("d.jsonl", str(path), 1.0)]
    plan = plan_parts(mix, 0.01, None, 0, {})
    assert len(plan.parts) > 5 and plan.records_per_file == [298]
    got = [(n, raw.decode()) for part in plan.parts for n, raw in iter_lines(str(path), part)]
    want = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    assert got == want
    for a, b in zip(plan.parts, plan.parts[1:]):
        assert a.end == b.start and b.first_record == a.first_record + a.records
        assert path.read_bytes()[b.start - 1:b.start] == b"\n"  # every part starts at a line start
    # the limit cuts the last part at the limit's line; the parts never depend on anything but inputs + options
    limited = plan_parts(mix, 0.01, 100, 0, {})
    assert sum(p.records for p in limited.parts) == 100
    assert plan_parts(mix, 0.01, None, 0, {}).fingerprint == plan.fingerprint
    assert plan_parts(mix, 0.01, None, 1, {}).fingerprint != plan.fingerprint


def test_mix_quotas_split_a_seeded_subset_without_replacement_over_parts():
    records = [40, 40, 40, 13]
    quotas = part_quotas(records, 2.5, 7, "f.jsonl")
    assert all(q.whole == 2 for q in quotas)
    assert sum(q.extra for q in quotas) == 67  # round(0.5 x 133), half up as the mix rounds
    for n, q in zip(records, quotas):
        chosen = extra_in_part(n, q)
        assert len(set(chosen.tolist())) == q.extra <= n and (chosen < n).all()
    assert [q.extra for q in part_quotas(records, 2.5, 7, "f.jsonl")] == [q.extra for q in quotas]
    assert [q.extra for q in part_quotas(records, 2.5, 8, "f.jsonl")] != [q.extra for q in quotas]


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory, demo_tok_dir):
    """The demo mix (weights 1 and 1.5) in ~20 KB parts with 1, 2 and 3 workers, and as a 2-node split."""
    tmp = tmp_path_factory.mktemp("split")
    common = dict(max_seq_len=256, part_size_mb=0.02, records_per_shard=8, cross_attention=False)
    mix = DEMO / "demo_mix.json"
    summaries = {w: run(mix, demo_tok_dir, tmp / f"w{w}", num_workers=w, **common) for w in (1, 2, 3)}
    node_out = tmp / "nodes"
    first = run(mix, demo_tok_dir, node_out, num_workers=2, num_nodes=2, node_rank=0, **common)
    with pytest.raises(DataError, match=r"parts are not finished .*node ranks \[1\] of 2"):
        cli_main_finalize(node_out)
    summaries["nodes"] = run(mix, demo_tok_dir, node_out, num_workers=1, num_nodes=2, node_rank=1, **common)
    return tmp, summaries, first


def cli_main_finalize(out: Path) -> None:
    from telechat_ms.data.process import finalize_output
    finalize_output(str(out), log=lambda msg: None)


def test_shards_identical_for_1_2_3_workers_and_a_2_node_split(split_runs):
    tmp, summaries, first = split_runs
    assert first["finalized"] is False and 0 < first["parts_finished"] < first["parts_total"]
    reference = digests(tmp / "w1")
    assert sum(n.endswith(".mindrecord") for n in reference) > manifest(tmp / "w1")["counts"]["parts"] >= 7
    for name in ("w2", "w3", "nodes"):
        assert digests(tmp / name) == reference, name
        assert manifest(tmp / name)["counts"] == manifest(tmp / "w1")["counts"]
        assert manifest(tmp / name)["shards"] == manifest(tmp / "w1")["shards"]
    drop = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
    assert drop(summaries[1]) == drop(summaries[2]) == drop(summaries[3]) == drop(summaries["nodes"])
    assert not any(p.name.startswith(".") for p in tmp.iterdir())  # no staging area left behind


def test_finalize_command_after_a_crashed_final_step(split_runs, tmp_path, demo_tok_dir, capsys):
    tmp, _, _ = split_runs
    common = dict(max_seq_len=256, part_size_mb=0.02, records_per_shard=8, cross_attention=False, num_nodes=2)
    out = tmp_path / "nodes"
    run(DEMO / "demo_mix.json", demo_tok_dir, out, node_rank=1, **common)
    (tmp_path / ".nodes.incomplete" / "finalize.lock").touch()  # a final step that crashed holding its lock
    last = run(DEMO / "demo_mix.json", demo_tok_dir, out, node_rank=0, **common)
    assert last["finalized"] is False and last["parts_finished"] == last["parts_total"] and not out.exists()
    assert cli_main(["process-data", "--finalize", str(out)]) == 0
    assert "slot fill" in capsys.readouterr().out
    assert digests(out) == digests(tmp / "w1")
    assert cli_main(["process-data", "--finalize", str(out)]) == 2  # nothing left to finalize: a clear error


def test_compact_rows_and_weights_from_the_prepass(split_runs):
    tmp, summaries, _ = split_runs
    m = manifest(tmp / "w1")
    assert m["columns"]["input_ids"] == ["int32", [-1]] and m["max_seq_len"] == 256
    assert [e["records_selected"] for e in m["mix"]] == [182, 27]  # 182 x 1.0, 18 x 1.5 -> 18 + 9
    compact = read_mindrecord(str(tmp / "w1"), pad=False)
    lengths = np.array([len(r) for r in compact["input_ids"]])
    assert lengths.sum() == m["counts"]["tokens"] and lengths.max() <= 256
    segments = sum(int((p == 0).sum()) for p in compact["position_ids"])
    counts = m["counts"]  # every record packed once per use but those with nothing to learn within 256 tokens
    assert segments == counts["records_selected"] - counts["dropped_no_target"] and counts["dropped_overlong"] == 0
    padded = read_mindrecord(str(tmp / "w1"))
    assert padded["input_ids"].shape == (len(lengths), 256)
    assert (padded["input_ids"][np.arange(256)[None] >= lengths[:, None]] == 3).all()


def _pretrain_file(tmp: Path, n_docs: int) -> Path:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "tele", "chat", "城市", "数据", "42", "7"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(3, 140)))) for _ in range(n_docs)]
    path = tmp / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.mark.parametrize("isolated", [False, True])
def test_pretrain_conserves_every_token_in_order(tmp_path, demo_tok, demo_tok_dir, isolated):
    path = _pretrain_file(tmp_path, 120)
    docs = [demo_tok.encode(json.loads(line)["text"]) + [2] for line in path.read_text(encoding="utf-8").splitlines()]
    max_len = 64
    assert max(map(len, docs)) > 4 * max_len  # documents several times max_seq_len long
    summary = run(path, demo_tok_dir, tmp_path / "out", task="pretrain", max_seq_len=max_len, part_size_mb=0.004,
                  num_workers=2, cross_attention=not isolated)
    m = manifest(tmp_path / "out")
    rows = read_mindrecord(str(tmp_path / "out"), pad=False)
    stream = np.concatenate(rows["input_ids"])
    assert np.array_equal(stream, np.concatenate(docs))  # every token, one <_end> per document, in order
    ids, labels = np.concatenate(rows["input_ids"]), np.concatenate(rows["labels"])
    parts = [s["part"] for s in m["shards"] for _ in range(s["records"])]
    short = [p for p, r in zip(parts, rows["input_ids"]) if len(r) < max_len]
    assert len(short) == len(set(short)) and m["counts"]["parts"] > 3  # at most one partial row per part
    assert summary["tokens_in"] == summary["tokens_out"] == sum(map(len, docs))
    assert summary["truncated"] == 0 and summary["records_selected"] == 120
    if not isolated:
        assert np.array_equal(ids, labels) and summary["supervised_tokens"] == summary["tokens"]
    else:  # each document's piece of a row restarts at 0, and its first token is predicted by nothing before it
        starts = np.cumsum([0] + [len(d) for d in docs])[:-1]
        row_starts = np.cumsum([0] + [len(r) for r in rows["input_ids"]])[:-1]
        want_zero = np.union1d(starts, row_starts)
        got_zero = np.flatnonzero(np.concatenate(rows["position_ids"]) == 0)
        assert np.array_equal(got_zero, want_zero)
        assert (labels[want_zero] == -100).all() and (np.delete(labels, want_zero) == np.delete(ids, want_zero)).all()
        assert summary["supervised_tokens"] == summary["tokens"] - len(want_zero)


def test_bad_lines_keep_file_line_across_parts(tmp_path, demo_tok_dir):
    good = lambda i: json.dumps({"input": f"question {i} " * 20, "output": f"answer {i}"})  # noqa: E731
    lines = [good(i) for i in range(120)]
    bad_at = [7, 33, 34, 80, 119]
    for n in bad_at:
        lines[n - 1] = "{not json" if n % 2 else json.dumps({"input": "only"})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = run(path, demo_tok_dir, tmp_path / "out", max_seq_len=128, part_size_mb=0.005, num_workers=2)
    assert summary["parts"] > 4 and summary["records_skipped"] == 5
    listed = (tmp_path / "out" / "skipped_lines.txt").read_text().splitlines()
    assert [line.split(": ")[0] for line in listed] == [f"{path}:{n}" for n in bad_at]
    with pytest.raises(DataError, match=rf"{path}:7: invalid JSON .*\(--on-error fail\)"):
        run(path, demo_tok_dir, tmp_path / "fail", max_seq_len=128, part_size_mb=0.005, on_error="fail")
    assert not (tmp_path / "fail").exists() and not (tmp_path / ".fail.incomplete").exists()


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "telechat_ms.cli", "process-data", *args]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                          capture_output=True, text=True, timeout=300, start_new_session=True)


def test_killed_run_resumes_to_the_same_bytes(tmp_path, demo_tok_dir):
    common = ["--data-mix", str(DEMO / "demo_mix.json"), "--tokenizer", str(demo_tok_dir), "--max-seq-len", "256",
              "--part-size-mb", "0.02", "--no-cross-attention"]
    whole = _cli(common + ["--out", str(tmp_path / "whole"), "--num-workers", "2", "--no-progress"])
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "out"
    killed = _cli(common + ["--out", str(out), "--num-workers", "1"], env={"TELECHAT_MS_FAULT": "kill_in_part:3"})
    assert killed.returncode == -signal.SIGKILL
    staging = tmp_path / ".out.incomplete"
    assert not out.exists() and staging.is_dir()  # a crash never leaves something that looks finished
    names = sorted(p.name for p in (staging / "parts").iterdir())
    assert any(n.startswith("p0") for n in names) and any(n.startswith(".p000003.tmp-") for n in names)
    assert "tok/s" in killed.stderr  # the progress bar counts tokens per second
    again = _cli(common + ["--out", str(out), "--num-workers", "2", "--no-progress"])
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _cli(common + ["--out", str(out), "--num-workers", "2", "--no-progress", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert digests(out) == digests(tmp_path / "whole")
    assert not staging.exists()


def test_released_sample_mix_fills_90_percent_of_the_slots_at_8192(tmp_path):
    """All six released SFT files, weight 1, real tokenizer, isolated packing of every record at 8192."""
    require_shared()
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({str(SAMPLE / "sft" / f"{name}.jsonl"): 1 for name in SFT_FILES}))
    summary = run(mix, REAL_TOKENIZER, tmp_path / "out", max_seq_len=8192, cross_attention=False, num_workers=2)
    rows = read_mindrecord(str(tmp_path / "out"), pad=False)
    lengths = np.array([len(r) for r in rows["input_ids"]])
    fill = lengths.sum() / (len(lengths) * 8192)
    assert fill >= 0.90 and summary["slot_fill"] == round(fill, 6)
    assert sum(int((p == 0).sum()) for p in rows["position_ids"]) == summary["records_read"] == 1800
    assert summary["truncated"] == summary["dropped"] == 0
    assert summary["bytes_per_token"] < 13  # compact rows: the 12 bytes of three int32 columns, not 8192-token rows
