"""run_scripts/serve_vllm.sh: the vLLM / vLLM-MindSpore command line for an export (DRY_RUN=1 prints it), and a
clear refusal for anything that is not an export. vLLM itself is not installable here (CUDA wheel, PLATFORM_NOTES):
the command is checked word by word against vLLM's documented `vllm serve` flags."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from telechat_ms.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "run_scripts" / "serve_vllm.sh"


@pytest.fixture(scope="module")
def export(tiny_gqa_ckpt, meta_dir, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("vllm_script")
    src = root / "src"
    shutil.copytree(tiny_gqa_ckpt, src)
    shutil.copy(meta_dir / "tokenizer.model", src / "tokenizer.model")
    out = root / "telechat2-tiny"
    assert main(["convert", "ms2hf", str(src), str(out), "--quiet"]) == 0
    return str(out)


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("ASCEND_HOME_PATH", "BACKEND", "MAX_MODEL_LEN")}
    base["PATH"] = "/usr/bin:/bin"  # no npu-smi, no vllm: what CI has
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**base, "PYTHON": sys.executable, **env})


def test_dry_run_prints_the_vllm_command(export):
    proc = _run(export, "2", DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == [
        "vllm", "serve", export, "--trust-remote-code", "--tensor-parallel-size", "2",
        "--served-model-name", "telechat2-tiny", "--max-model-len", "32", "--dtype", "auto",
        "--host", "127.0.0.1", "--port", "8000"]


def test_dry_run_for_ascend_and_overrides(export):
    proc = _run(export, DRY_RUN="1", BACKEND="auto", ASCEND_HOME_PATH="/usr/local/Ascend", PORT="9000",
                SERVED_MODEL_NAME="my model", MAX_MODEL_LEN="16", EXTRA_ARGS="--enforce-eager --seed 3")
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == [
        "env", "vLLM_MODEL_BACKEND=MindFormers", "vllm-mindspore", "serve", export, "--trust-remote-code",
        "--tensor-parallel-size", "1", "--served-model-name", "my model", "--max-model-len", "16", "--dtype",
        "auto", "--host", "127.0.0.1", "--port", "9000", "--enforce-eager", "--seed", "3"]


def test_without_vllm_installed_it_says_so(export):
    proc = _run(export)
    assert proc.returncode == 2 and "vllm: not installed here" in proc.stderr


def _broken(export: str, tmp_path: Path, edit) -> str:
    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    edit(bad)
    return str(bad)


def _edit_config(**changes):
    def edit(path: Path) -> None:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(changes)
        (path / "config.json").write_text(json.dumps(cfg))
    return edit


@pytest.mark.parametrize("edit,message", [
    (_edit_config(architectures=["TelechatForCausalLM"]),
     "architectures is ['TelechatForCausalLM'], vLLM needs ['TeleChat2ForCausalLM']"),
    (_edit_config(num_key_value_heads=None), "field 'num_key_value_heads' must be a positive integer, got None"),
    (lambda p: (p / "configuration_telechat2.py").unlink(), "auto_map.AutoConfig names no configuration module"),
    (lambda p: (p / "tokenizer.model").unlink(), "no tokenizer.model"),
    (lambda p: (p / "model.safetensors").unlink(), "no *.safetensors weights"),
    (lambda p: (p / "config.json").write_text("{oops"), "config.json is not valid JSON"),
])
def test_refuses_what_is_not_an_export(export, tmp_path, edit, message):
    bad = _broken(export, tmp_path, edit)
    proc = _run(bad, DRY_RUN="1")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert message in proc.stderr and bad in proc.stderr, proc.stderr


def test_refuses_missing_dirs_bad_tp_and_a_mindspore_checkpoint(export, tiny_gqa_ckpt, tmp_path):
    proc = _run(str(tmp_path / "nope"), DRY_RUN="1")
    assert proc.returncode == 2 and "nope: no such directory" in proc.stderr
    proc = _run(export, "3", DRY_RUN="1")
    assert proc.returncode == 2 and "n_head 4 is not divisible by TP 3" in proc.stderr
    proc = _run(export, "zero", DRY_RUN="1")
    assert proc.returncode == 2 and "TP must be a positive integer" in proc.stderr
    proc = _run(tiny_gqa_ckpt, DRY_RUN="1")  # a released-style HF directory, not an export
    assert proc.returncode == 2 and "not a telechat-ms export" in proc.stderr
    proc = _run()
    assert proc.returncode == 2 and "usage: serve_vllm.sh MODEL_DIR [TP]" in proc.stderr
