"""Training checkpoints: model + optimizer state + trainer state in one directory per step, written to a
temporary directory and renamed when complete, so a crash mid-save leaves the previous checkpoint intact.

    <output_dir>/checkpoints/step_00000010/{model.safetensors, optimizer.safetensors, trainer_state.json}
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np

from telechat_ms.checkpoint_io import assign_from_safetensors, write_sharded_safetensors
from telechat_ms.errors import CheckpointError
from telechat_ms.io import atomic_output_dir, atomic_write_text, read_json_object

_STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"


def _fault(kind: str, step: int) -> bool:
    """Fault injection for tests: TELECHAT_MS_FAULT='crash_in_save:20' or 'kill_after_step:10'."""
    spec = os.environ.get("TELECHAT_MS_FAULT", "")
    return spec == f"{kind}:{step}"


def _write_params(directory: str, filename: str, params: dict) -> None:
    import mindspore as ms
    names = list(params)

    def produce(i: int) -> np.ndarray:
        p = params[names[i]]
        arr = p.asnumpy() if p.dtype == ms.float32 else p.astype(ms.float32).asnumpy()
        return np.ascontiguousarray(arr, dtype=np.float32)

    specs = [(n, tuple(params[n].shape), "float32") for n in names]
    write_sharded_safetensors(directory, specs, produce, 10**15, prefix=filename)


def save_checkpoint(root: str, step: int, model_params: dict, optimizer_params: dict, state: dict,
                    keep: int = 3) -> str:
    """Write step `step` atomically under `root`, then delete all but the newest `keep` checkpoints."""
    os.makedirs(root, exist_ok=True)
    for stale in os.listdir(root):  # temp dirs of a save that crashed earlier
        if stale.startswith(".step_"):
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    final = os.path.join(root, f"step_{step:08d}")
    with atomic_output_dir(final, overwrite=True) as tmp:
        _write_params(tmp, "model", model_params)
        if _fault("crash_in_save", step):
            os._exit(86)  # simulated power loss half way through the save
        _write_params(tmp, "optimizer", optimizer_params)
        atomic_write_text(os.path.join(tmp, STATE_FILE), json.dumps({**state, "step": step}, indent=2) + "\n")
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: str) -> str | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str, model_params: dict, optimizer_params: dict) -> dict:
    """Restore parameters and optimizer state in place; return the trainer state."""
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise CheckpointError(f"{path}: not a complete training checkpoint (no {STATE_FILE})")
    assign_from_safetensors(os.path.join(path, "model.safetensors"), model_params, "model")
    assign_from_safetensors(os.path.join(path, "optimizer.safetensors"), optimizer_params, "optimizer")
    return read_json_object(state_file, CheckpointError)
