"""The persistent compile cache of the paged step (telechat_ms.infer.compile_cache): a second stepper loads every
graph the first compiled, in another order and over other weights, and computes what a fresh compile computes;
anything the graph depends on is in the key; MindSpore's order-keyed cache is refused."""
from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("mindspore")

from telechat_ms.errors import ConfigError  # noqa: E402
from telechat_ms.infer import compile_cache as cc  # noqa: E402

BLOCK = 8
WIDTHS = (4, 16, 24)      # prefill widths: each its own graph (and a decode over each)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Two checkpoints of one config, different weights."""
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    out = []
    for seed in (1, 2):
        path = str(tmp_path_factory.mktemp("cc") / f"m{seed}")
        write_random_hf_checkpoint(path, tiny_config(vocab_size=512, seq_length=64), qk_scale=4.0, seed=seed)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def models(model_dirs):
    from telechat_ms.model.telechat import TeleChatForCausalLM
    return [TeleChatForCausalLM.from_pretrained(p) for p in model_dirs]


RUN = r"""
import json, os, sys
import numpy as np
from telechat_ms.infer import compile_cache as cc
from telechat_ms.infer.paged import PagedStepper
from telechat_ms.model.telechat import TeleChatForCausalLM
model_dir, root, widths, out = sys.argv[1], sys.argv[2] or None, json.loads(sys.argv[3]), sys.argv[4]
st = PagedStepper(TeleChatForCausalLM.from_pretrained(model_dir), 8, %d, compile_cache=root)
logits = {}
for w in widths:       # a prompt of w tokens from block 1 on, then one decode over it
    ids = (np.arange(w, dtype=np.int32)[None] * 7 + 3) %% 500
    pos = np.arange(w)[None]
    blocks = np.arange(1, 1 + -(-(w + 1) // %d), dtype=np.int32)[None]
    logits[f"p{w}"] = st.step(ids, pos, np.full((1, w), w), %d + pos, blocks, w - 1)
    logits[f"d{w}"] = st.step(np.array([[11]], np.int32), np.array([[w]]), np.array([[w + 1]]),
                              np.array([[%d + w]]), blocks, 0)
np.savez(out, **logits)
c = st._compile_cache
scratch = os.path.join(cc._scratch, "rank_0", "graph_cache") if cc._scratch else None
left = [f for f in os.listdir(scratch) if f.endswith(".mindir")] if scratch else []
print(json.dumps({"hits": c.hits if c else 0, "misses": c.misses if c else 0, "skipped": c.skipped if c else 0,
                  "left": left}))
""" % ((BLOCK,) * 4)


def _run(model_dir: str, root: str | None, widths, out: str, inline: bool = False) -> dict:
    """A process of its own (a restart): one stepper over model_dir running the widths' prefill + decode."""
    import json
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(out), "run_stepper.py")    # a file: MindSpore hashes the entry script
    with open(script, "w") as fh:
        fh.write(RUN)
    proc = subprocess.run([sys.executable, *(["-c", RUN] if inline else [script]), model_dir, root or "", json.dumps(list(widths)), out],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_restart_loads_every_graph_in_another_order_and_computes_a_fresh_compile(model_dirs, tmp_path):
    root = str(tmp_path / "cache")
    first = _run(model_dirs[0], root, WIDTHS, str(tmp_path / "a.npz"))
    assert (first["hits"], first["misses"]) == (0, 2 * len(WIDTHS)) and first["left"] == []
    stored = sorted(f for d in os.listdir(root) if not d.startswith(".")
                    for f in os.listdir(os.path.join(root, d)) if f.endswith(".mindir"))
    assert len(stored) == 2 * len(WIDTHS)          # one file per graph: prefill and decode of every width
    # other weights, the reverse order: every graph loaded, every logit what a fresh compile gives
    cached = _run(model_dirs[1], root, WIDTHS[::-1], str(tmp_path / "b.npz"))
    assert (cached["hits"], cached["misses"]) == (2 * len(WIDTHS), 0) and cached["left"] == []
    _run(model_dirs[1], None, WIDTHS, str(tmp_path / "c.npz"))
    got, want = np.load(tmp_path / "b.npz"), np.load(tmp_path / "c.npz")
    assert sorted(got.files) == sorted(want.files)
    for name in want.files:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not np.array_equal(np.load(tmp_path / "a.npz")["p4"], want["p4"])    # the weights do differ
    # python -c has no entry script for MindSpore to hash: compiled without the cache, not a crash
    inline = _run(model_dirs[1], root, WIDTHS[:1], str(tmp_path / "d.npz"), inline=True)
    assert (inline["hits"], inline["misses"], inline["skipped"]) == (0, 0, 2)
    np.testing.assert_array_equal(np.load(tmp_path / "d.npz")["p4"], want["p4"])


def test_the_key_holds_what_the_graph_depends_on(models, tmp_path):
    root = str(tmp_path / "cache")
    a = cc.CompileCache(root, cc.paged_graph_key(models[0].config, 8, BLOCK, False, None))
    same = cc.CompileCache(root, cc.paged_graph_key(models[1].config, 8, BLOCK, False, None))
    assert a.key == same.key                        # weights are not in the graph
    for other in (cc.paged_graph_key(models[0].config, 9, BLOCK, False, None),
                  cc.paged_graph_key(models[0].config, 8, 16, False, None),
                  cc.paged_graph_key(models[0].config, 8, BLOCK, True, None),
                  cc.paged_graph_key(models[0].config, 8, BLOCK, False, "O1"),
                  cc.paged_graph_key(models[0].config, 8, BLOCK, False, None, head_major=True)):
        assert cc.CompileCache(root, other).key != a.key
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "m.py").write_text("x = 1\n")
    before = cc.source_digest(pkg)
    (pkg / "sub" / "m.py").write_text("x = 2\n")
    assert cc.source_digest(pkg) != before


def test_mindspores_order_keyed_cache_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(cc, "_scratch", None)
    monkeypatch.setenv("MS_COMPILER_CACHE_ENABLE", "1")
    with pytest.raises(ConfigError, match="MS_COMPILER_CACHE_ENABLE"):
        cc._scratch_dir(str(tmp_path))


def test_compile_cache_flags():
    import argparse
    from telechat_ms.commands.serve import add_paged_cache_args, paged_cache_options
    p = argparse.ArgumentParser()
    add_paged_cache_args(p)
    assert paged_cache_options(p.parse_args([]))["compile_cache"] == cc.default_dir()
    assert paged_cache_options(p.parse_args(["--compile-cache-dir", "/x"]))["compile_cache"] == "/x"
    assert paged_cache_options(p.parse_args(["--no-compile-cache"]))["compile_cache"] is None
    with pytest.raises(ConfigError, match="contradict"):
        paged_cache_options(p.parse_args(["--no-compile-cache", "--compile-cache-dir", "/x"]))
