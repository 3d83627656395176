"""The HF <-> MindSpore weight map of TeleChat2, defined once and used both ways, plus conversion,
validation from an index file, and loading/saving a TeleChatForCausalLM tensor by tensor.

HF names are the released torch names (transformer.h.{i}.self_attention.key_value.weight ...); MindSpore names
are those of the public MindSpore port (model.layers.{i}.attention.wk_v.weight ...). Layouts are identical
(MindFormers' Linear uses transpose_b and wk_v keeps the per-head interleaved [k_h; v_h] rows), so the map is a
pure rename: no tensor is ever transposed or re-ordered.

MoE (spec 12): the HF release keeps one tensor per expert (transformer.h.N.mlp.local_experts.E.gate_proj.weight ...)
and the router as mlp.router.weight; MindSpore stacks the experts as MindFormers' convert_weight does
(feed_forward.ffn.w1.weight [E, F, H], w3 [E, F, H], w2 [E, H, F], w2.bias [1, E, 1, H]; router
feed_forward.router.dense.weight). A checkpoint in the grouped-matmul layout of the NPU inference release
(convert_gmm.py: w1 / w3 / w2 transposed to [E, H, F] / [E, F, H]) is read too (told apart by shape).
"""
from __future__ import annotations

import os
import re
import shutil

import numpy as np
from tqdm import tqdm

from telechat_ms.checkpoint_io import (FLOAT_DTYPES, STORAGE, TensorEntry, checkpoint_entries, convert_dtype,
                                       itemsize, load_index, numel, parse_size, safetensors_entries,
                                       write_sharded_safetensors)
from telechat_ms import hf_export
from telechat_ms.config import TeleChatConfig
from telechat_ms.errors import CheckpointError, ConfigError
from telechat_ms.io import atomic_output_dir, read_json_object

# (HF suffix, MindSpore suffix) inside one decoder layer.
LAYER_MAP: tuple[tuple[str, str], ...] = (
    ("input_layernorm.weight", "attention_norm.weight"),
    ("self_attention.query.weight", "attention.wq.weight"),
    ("self_attention.key_value.weight", "attention.wk_v.weight"),
    ("self_attention.dense.weight", "attention.wo.weight"),
    ("self_attention.dense.bias", "attention.wo.bias"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "feed_forward.w1.weight"),
    ("mlp.up_proj.weight", "feed_forward.w3.weight"),
    ("mlp.down_proj.weight", "feed_forward.w2.weight"),
    ("mlp.down_proj.bias", "feed_forward.w2.bias"),
    ("mlp.router.weight", "feed_forward.router.dense.weight"),
)
# MoE experts: (HF suffix after mlp.local_experts.E., MindSpore stacked suffix).
EXPERT_MAP: tuple[tuple[str, str], ...] = (
    ("gate_proj.weight", "feed_forward.ffn.w1.weight"),
    ("up_proj.weight", "feed_forward.ffn.w3.weight"),
    ("down_proj.weight", "feed_forward.ffn.w2.weight"),
    ("down_proj.bias", "feed_forward.ffn.w2.bias"),
)
_HF_EXPERT = re.compile(r"^mlp\.local_experts\.(\d+)\.(.+)$")
_HF2MS_EXPERT = dict(EXPERT_MAP)
_MS2HF_EXPERT = {m: h for h, m in EXPERT_MAP}
GLOBAL_MAP: tuple[tuple[str, str], ...] = (
    ("transformer.word_embeddings.weight", "model.tok_embeddings.embedding_weight"),
    ("transformer.word_embeddings_layernorm.weight", "model.word_embeddings_layernorm.weight"),
    ("transformer.ln_f.weight", "model.norm_out.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
_HF_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_MS_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF2MS_LAYER = dict(LAYER_MAP)
_MS2HF_LAYER = {m: h for h, m in LAYER_MAP}
_HF2MS_GLOBAL = dict(GLOBAL_MAP)
_MS2HF_GLOBAL = {m: h for h, m in GLOBAL_MAP}
# Training-state entries a MindSpore checkpoint may carry next to the weights; never model weights.
_MS_TRAINING_STATE = re.compile(r"^(adam_m|adam_v|moment1|moment2|accu_grads|exp_avg|exp_avg_sq)\.|"
                                r"^(global_step|learning_rate|scale_sense|current_iterator_step|epoch_num|step_num|"
                                r"loss_scale|last_overflow_iterator_step|beta1_power|beta2_power)$")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# A LoRA adapter directory (written by training, read by `lora merge` and load_adapter).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def hf_to_ms(name: str) -> str:
    """MindSpore (port) name of an HF tensor name (an MoE expert's tensor: the stacked tensor holding it);
    KeyError if it is not a TeleChat2 weight."""
    m = _HF_LAYER.match(name)
    if m:
        expert = _HF_EXPERT.match(m.group(2))
        if expert:
            return f"model.layers.{m.group(1)}.{_HF2MS_EXPERT[expert.group(2)]}"
        return f"model.layers.{m.group(1)}.{_HF2MS_LAYER[m.group(2)]}"
    return _HF2MS_GLOBAL[name]


def expert_index(hf_name: str) -> int | None:
    """E of an HF name transformer.h.N.mlp.local_experts.E.*, else None."""
    m = _HF_LAYER.match(hf_name)
    expert = _HF_EXPERT.match(m.group(2)) if m else None
    return int(expert.group(1)) if expert else None


def ms_to_hf(name: str) -> str:
    """HF name of a MindSpore (port) tensor name; KeyError if it is not a TeleChat2 weight or is a stacked MoE
    tensor (ms_to_hf_names gives the names those hold)."""
    m = _MS_LAYER.match(name)
    if m:
        return f"transformer.h.{m.group(1)}.{_MS2HF_LAYER[m.group(2)]}"
    return _MS2HF_GLOBAL[name]


def ms_to_hf_names(name: str, num_experts: int) -> list[str]:
    """The HF names a MindSpore tensor holds: one, or every expert's for a stacked MoE tensor."""
    m = _MS_LAYER.match(name)
    if m and m.group(2) in _MS2HF_EXPERT:
        return [f"transformer.h.{m.group(1)}.mlp.local_experts.{e}.{_MS2HF_EXPERT[m.group(2)]}"
                for e in range(num_experts)]
    return [ms_to_hf(name)]


def ms_layout(cfg: TeleChatConfig) -> list[tuple[str, tuple[int, ...], list[str]]]:
    """The MindSpore tensors of a model, in canonical order: (name, shape, the HF names it holds). A stacked MoE
    tensor holds every expert's tensor, stacked on a leading expert axis (a bias as [1, E, 1, H])."""
    out: dict[str, tuple[tuple[int, ...], list[str]]] = {}
    for hf_name, shape in cfg.parameter_shapes().items():
        ms_name = hf_to_ms(hf_name)
        if ms_name not in out:
            out[ms_name] = (shape, [])
        out[ms_name][1].append(hf_name)
    layout = []
    for ms_name, (shape, hf_names) in out.items():
        if expert_index(hf_names[0]) is not None:
            shape = (1, len(hf_names), 1, *shape) if ms_name.endswith(".bias") else (len(hf_names), *shape)
        layout.append((ms_name, tuple(shape), hf_names))
    return layout


def stack_experts(arrays: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """One MindSpore tensor of `shape` from its HF tensors (one: as it is; experts: stacked)."""
    return arrays[0] if len(arrays) == 1 and arrays[0].shape == tuple(shape) else np.stack(arrays).reshape(shape)


def expert_slice(stacked: np.ndarray, e: int) -> np.ndarray:
    """Expert e's HF tensor of a stacked MindSpore tensor ([E, ...] or a bias [1, E, 1, H])."""
    return np.ascontiguousarray(stacked[0, e, 0] if stacked.ndim == 4 else stacked[e])


class _LastRead:
    """Reads of a stacked tensor, one expert at a time, share one read: the last stacked tensor stays in memory."""

    def __init__(self) -> None:
        self.key: object = None
        self.value: np.ndarray | None = None

    def get(self, key: object, read) -> np.ndarray:
        if self.key is not key:
            self.key, self.value = None, None
            self.value, self.key = read(), key
        return self.value


def _expert_entries(e: TensorEntry, cfg: TeleChatConfig, cache: _LastRead) -> list[tuple[str, TensorEntry]]:
    """A stacked MoE tensor of a MindSpore checkpoint as one entry per expert, in HF names and shapes. The NPU
    inference layout (experts transposed for grouped matmul) and a bias stacked as [E, H] are read too."""
    hf_names = ms_to_hf_names(e.name, cfg.num_experts)
    hf_shape = cfg.parameter_shapes().get(hf_names[0])
    if hf_shape is None:
        raise CheckpointError(f"{e.file}: unknown tensor '{e.name}' (not a weight of this TeleChat2 MoE model)")
    n = len(hf_names)
    shape = tuple(e.shape)
    stacked = (1, n, 1, *hf_shape) if len(hf_shape) == 1 else (n, *hf_shape)
    transposed = (n, hf_shape[1], hf_shape[0]) if len(hf_shape) == 2 else None
    if shape == stacked or (len(hf_shape) == 1 and shape == (n, *hf_shape)):
        fix = None
    elif transposed is not None and shape == transposed and hf_shape[0] != hf_shape[1]:
        fix = (0, 2, 1)  # convert_gmm.py's layout
    else:
        raise CheckpointError(f"{e.file}: tensor '{e.name}' has shape {list(shape)}, the config implies "
                              f"{list(stacked)} ({n} experts stacked)")

    def read_all(e=e, fix=fix) -> np.ndarray:
        arr = e.read()
        return arr.reshape(stacked) if fix is None else np.ascontiguousarray(arr.transpose(fix))

    out = []
    for i, hf_name in enumerate(hf_names):
        def read(i=i) -> np.ndarray:
            return expert_slice(cache.get(e, read_all), i)
        out.append((hf_name, TensorEntry(f"{e.name}[{i}]", hf_shape, e.dtype, e.file, read)))
    return out


def naming_of(names: list[str]) -> str:
    """'hf' or 'ms', from the names of a checkpoint; mixed or foreign names are an error."""
    hf = [n for n in names if n.startswith("transformer.") or n == "lm_head.weight"]
    ms = [n for n in names if n.startswith("model.") or n == "lm_head.weight"]
    if names and len(hf) == len(names):
        return "hf"
    if names and len(ms) == len(names):
        return "ms"
    other = [n for n in names if n not in hf and n not in ms]
    raise CheckpointError("cannot tell the checkpoint's naming: "
                          + (f"unknown tensor '{other[0]}'" if other else "it mixes HF and MindSpore names"))


def canonical_entries(entries: list[TensorEntry], cfg: TeleChatConfig) -> dict[str, TensorEntry]:
    """Map a checkpoint's tensors to HF names and check them against the config: every name known, none
    missing, every shape as the config implies. Errors name the tensor and its file."""
    entries = [e for e in entries if not _MS_TRAINING_STATE.match(e.name)]
    naming = naming_of([e.name for e in entries])
    expected = cfg.parameter_shapes()
    found: dict[str, TensorEntry] = {}
    cache = _LastRead()
    for e in entries:
        if naming == "ms" and len(ms_to_hf_names(e.name, cfg.num_experts)) > 1 and cfg.is_moe:
            for hf_name, part in _expert_entries(e, cfg, cache):
                found[hf_name] = part
            continue
        try:
            hf_name = e.name if naming == "hf" else ms_to_hf(e.name)
        except KeyError:
            hf_name = None
        if hf_name is None or hf_name not in expected:
            raise CheckpointError(f"{e.file}: unknown tensor '{e.name}' (not a weight of a TeleChat2 model with "
                                  f"{cfg.n_layer} layers{', embed_layernorm' if cfg.embed_layernorm else ''})")
        if tuple(e.shape) != expected[hf_name]:
            raise CheckpointError(f"{e.file}: tensor '{e.name}' has shape {list(e.shape)}, the config implies "
                                  f"{list(expected[hf_name])}")
        if e.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{e.file}: tensor '{e.name}' has dtype {e.dtype}, expected a float type")
        found[hf_name] = e
    missing = [n for n in expected if n not in found]
    if missing:
        shown = ", ".join(f"'{n}'" for n in missing[:3])
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s) the config needs: {shown}"
                              + (" ..." if len(missing) > 3 else ""))
    return {n: found[n] for n in expected}  # canonical order: embedding, layers, final norm, lm_head


def validate_index(index_path: str, cfg: TeleChatConfig) -> dict:
    """Check an HF/MS index file alone (no tensor data): every name maps, none is missing, and the index's
    total_size equals the size the config implies. Returns a small report."""
    index = load_index(index_path)
    names = list(index["weight_map"])
    naming = naming_of(names)
    expected = cfg.parameter_shapes()
    mapped = []
    for name in names:
        try:
            hf_names = [name] if naming == "hf" else ms_to_hf_names(name, cfg.num_experts)
            pairs = [(h, hf_to_ms(h)) for h in hf_names]
        except KeyError:
            raise CheckpointError(f"{index_path}: unknown tensor '{name}'") from None
        if not pairs or any(h not in expected for h, _ in pairs):
            raise CheckpointError(f"{index_path}: tensor '{name}' is not a weight of the configured model")
        mapped.extend(pairs)
    missing = sorted(set(expected) - {h for h, _ in mapped})
    if missing:
        raise CheckpointError(f"{index_path}: missing {len(missing)} tensor(s), e.g. '{missing[0]}'")
    n_params = cfg.num_parameters()
    total = index.get("metadata", {}).get("total_size")
    dtype = None
    if total is not None:
        matches = [d for d in FLOAT_DTYPES if n_params * itemsize(d) == int(total)]
        if not matches:
            raise CheckpointError(f"{index_path}: total_size {total} bytes does not match {n_params} parameters "
                                  f"in fp32 ({n_params * 4}) or 16-bit ({n_params * 2})")
        dtype = matches[0] if len(matches) == 1 or matches[0] == "float32" else "16-bit"
    return {"tensors": len(names), "naming": naming, "parameters": n_params, "total_size": total,
            "dtype": dtype, "map": mapped}


def copy_tokenizer_files(src: str, dst: str, overwrite: bool = True) -> list[str]:
    """Copy the tokenizer and generation files (TOKENIZER_FILES) of directory `src` into `dst`; `src` may also be
    a tokenizer .model file, copied as tokenizer.model. Files already in dst are kept unless overwrite. Returns the
    names copied."""
    copied = []
    if os.path.isfile(src):
        target = os.path.join(dst, TOKENIZER_FILES[0])
        if overwrite or not os.path.isfile(target):
            shutil.copy2(src, target)
            copied.append(TOKENIZER_FILES[0])
        src = os.path.dirname(src)
    if not os.path.isdir(src):
        return copied
    for name in TOKENIZER_FILES:
        path, target = os.path.join(src, name), os.path.join(dst, name)
        if name not in copied and os.path.isfile(path) and (overwrite or not os.path.isfile(target)):
            shutil.copy2(path, target)
            copied.append(name)
    return copied


def export_dtype(dtypes: list[str]) -> str:
    """The dtype an export's config.json states: the weights' one dtype, float32 if they mix (loaders cast)."""
    found = set(dtypes)
    return found.pop() if len(found) == 1 else "float32"


def finish_hf_export(directory: str, cfg: TeleChatConfig, dtype: str, sources: tuple[str, ...] = ()) -> list[str]:
    """Make a directory of HF-named safetensors an export other engines load (spec 9): config.json for vLLM and
    transformers with our configuration module, then tokenizer.model and generation_config.json from the first of
    `sources` that has them, with our tokenizer module, tokenizer_config.json and special_tokens_map.json (a
    source's released ones point at code the export does not ship). Returns the file names written."""
    cfg.save_pretrained(directory, export_dtype=dtype)
    written = ["config.json", hf_export.CONFIG_CODE_FILE]
    for src in sources:
        written += copy_tokenizer_files(src, directory, overwrite=False)
    if os.path.isfile(os.path.join(directory, TOKENIZER_FILES[0])):
        written += hf_export.write_tokenizer_code(directory, model_max_length=cfg.seq_length)
    return sorted(set(written))


def _config_for(src: str) -> TeleChatConfig:
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: no such checkpoint directory or file")
    folder = src if os.path.isdir(src) else os.path.dirname(src)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigError(f"{folder}: no config.json next to the weights")
    return TeleChatConfig.from_pretrained(folder)


def convert_checkpoint(src: str, dst: str, target: str, dtype: str | None = None,
                       max_shard_size: str | int = "5GB", overwrite: bool = False, show_progress: bool = True) -> dict:
    """Convert a checkpoint directory to `target` naming ('ms' or 'hf'), streaming one tensor at a time.

    The output is written into a temporary directory renamed to `dst` only when complete.
    """
    if target not in ("ms", "hf"):
        raise ValueError(f"target must be 'ms' or 'hf', got {target!r}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    cfg = _config_for(src)
    entries = canonical_entries(checkpoint_entries(src), cfg)
    if target == "hf":
        groups = [(n, entries[n].shape, [n]) for n in entries]
    else:  # MindSpore names: MoE experts stacked
        groups = ms_layout(cfg)
    specs = [(out, shape, dtype or entries[hf[0]].dtype) for out, shape, hf in groups]

    def produce(i: int):
        hf_names = groups[i][2]
        e = entries[hf_names[0]]
        if len(hf_names) == 1 and e.raw is not None and e.dtype == specs[i][2]:
            return e.raw  # same dtype: copy the bytes file to file, never through Python memory
        return stack_experts([convert_dtype(entries[n].read(), entries[n].dtype, specs[i][2]) for n in hf_names],
                             specs[i][1])

    total = sum(numel(s) * itemsize(d) for _, s, d in specs)
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"convert to {target}",
                  disable=not show_progress) as bar:
            index = write_sharded_safetensors(tmp, specs, produce, parse_size(max_shard_size), progress=bar)
        if target == "hf":
            finish_hf_export(tmp, cfg, export_dtype([d for _, _, d in specs]), sources=(src,))
        else:
            cfg.save_pretrained(tmp)
            copy_tokenizer_files(src, tmp)
    return index


def merge_adapter_dir(base: str, adapter: str, out: str, fmt: str = "ms", dtype: str | None = None,
                      max_shard_size: str | int = "5GB") -> str:
    """`telechat-ms lora merge`: base checkpoint + adapter directory -> a plain model directory, tensor by tensor.

    Every adapted weight becomes W + (alpha / rank) * B @ A in float32 (the formula LoRALinear computes); all
    tensors are written in `dtype` (default: the config's param_dtype) with MindSpore ('ms') or HF ('hf') names.
    Tokenizer files come from the adapter directory, else from the base.
    """
    cfg = _config_for(base)
    if cfg.is_moe:
        raise CheckpointError(f"{base}: lora merge does not handle MoE checkpoints (stacked experts) yet")
    cfg_file = os.path.join(adapter, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"{adapter}: no {ADAPTER_CONFIG} (not a LoRA adapter directory)")
    lora = read_json_object(cfg_file, CheckpointError)
    try:
        scaling = float(lora["alpha"]) / int(lora["rank"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise CheckpointError(f"{cfg_file}: needs a positive integer 'rank' and a number 'alpha'") from None
    adapters = {e.name: e for e in safetensors_entries(os.path.join(adapter, ADAPTER_WEIGHTS))}
    entries = canonical_entries(checkpoint_entries(base), cfg)
    names = list(entries)
    dtype = dtype or cfg.param_dtype
    used: set[str] = set()

    def produce(i: int) -> np.ndarray:
        e = entries[names[i]]
        weight = convert_dtype(e.read(), e.dtype, "float32")
        prefix = hf_to_ms(names[i]).removesuffix(".weight")
        a, b = adapters.get(prefix + ".lora_a"), adapters.get(prefix + ".lora_b")
        if a is not None and b is not None:
            delta = convert_dtype(b.read(), b.dtype, "float32") @ convert_dtype(a.read(), a.dtype, "float32")
            if delta.shape != weight.shape:
                raise CheckpointError(f"{adapter}: adapter of '{prefix}' gives {list(delta.shape)}, the weight is "
                                      f"{list(weight.shape)}")
            weight = weight + np.float32(scaling) * delta
            used.update((a.name, b.name))
        return convert_dtype(weight.astype(np.float32), "float32", dtype)

    out_names = names if fmt == "hf" else [hf_to_ms(n) for n in names]
    specs = [(o, entries[n].shape, dtype) for n, o in zip(names, out_names)]
    with atomic_output_dir(out, overwrite=True) as tmp:
        write_sharded_safetensors(tmp, specs, produce, parse_size(max_shard_size))
        unused = sorted(set(adapters) - used)
        if unused:
            raise CheckpointError(f"{adapter}: adapter tensor '{unused[0]}' matches no weight of {base}")
        if fmt == "hf":
            finish_hf_export(tmp, cfg, dtype, sources=(adapter, base))
        else:
            cfg.save_pretrained(tmp)
            copy_tokenizer_files(adapter, tmp)
            copy_tokenizer_files(base, tmp, overwrite=False)
    return out


# ---------------------------------------------------------------------------------------------- model <-> files
def load_into_model(model, path: str) -> None:
    """Fill a TeleChatForCausalLM from an HF or MindSpore checkpoint, one tensor at a time (strict)."""
    import mindspore as ms
    params = {p.name: p for p in model.get_parameters()}  # p.name stays the checkpoint name under LoRA wrappers
    for ms_name, f32, e in model_tensors(checkpoint_entries(path), model.config):
        param = params.get(ms_name)
        if param is None:
            raise CheckpointError(f"{e.file}: tensor '{e.name}' has no parameter '{ms_name}' in the model")
        param.set_data(ms.Tensor(f32, dtype=param.dtype))


def model_tensors(entries: list[TensorEntry], cfg: TeleChatConfig):
    """(MindSpore name, fp32 array in the model's layout, a source entry) for every parameter, one at a time:
    the checkpoint checked against the config, MoE experts stacked (conversion to fp32 is exact)."""
    canonical = canonical_entries(entries, cfg)
    for ms_name, shape, hf_names in ms_layout(cfg):
        arrays = [convert_dtype(canonical[n].read(), canonical[n].dtype, "float32") for n in hf_names]
        yield ms_name, stack_experts(arrays, shape), canonical[hf_names[0]]


def parameter_array(param, dtype: str) -> np.ndarray:
    """A MindSpore parameter as numpy storage of `dtype` (bf16 as uint16 bits), exactly."""
    import mindspore as ms
    f32 = param.astype(ms.float32).asnumpy() if param.dtype != ms.float32 else param.asnumpy()
    return convert_dtype(np.asarray(f32, dtype=np.float32), "float32", dtype)


def save_model(model, path: str, fmt: str = "ms", dtype: str | None = None,
               max_shard_size: str | int = "5GB") -> str:
    """Write a model as config.json + safetensors shards, with MindSpore ('ms') or HF ('hf') names; an 'hf' directory
    is an export other engines load (finish_hf_export)."""
    cfg: TeleChatConfig = model.config
    params = {p.name: p for p in model.get_parameters()}  # p.name stays the checkpoint name under LoRA wrappers
    dtype = dtype or cfg.param_dtype
    if fmt == "hf":  # one tensor per HF name; an expert's tensor is cut from its stacked parameter
        hf_shapes = cfg.parameter_shapes()
        specs = [(n, hf_shapes[n], dtype) for n in hf_shapes]
        cache = _LastRead()

        def produce(i: int) -> np.ndarray:
            name = specs[i][0]
            param = params[hf_to_ms(name)]
            e = expert_index(name)
            if e is None:
                return parameter_array(param, dtype)
            return expert_slice(cache.get(param, lambda: parameter_array(param, dtype)), e)
    else:
        specs = [(n, tuple(params[n].shape), dtype) for n, _, _ in ms_layout(cfg)]

        def produce(i: int) -> np.ndarray:
            return parameter_array(params[specs[i][0]], dtype)
    with atomic_output_dir(path, overwrite=True) as tmp:
        write_sharded_safetensors(tmp, specs, produce, parse_size(max_shard_size))
        if fmt == "hf":
            finish_hf_export(tmp, cfg, dtype)
        else:
            cfg.save_pretrained(tmp)
    return path


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LAYER_MAP", "GLOBAL_MAP", "EXPERT_MAP", "TOKENIZER_FILES", "hf_to_ms",
           "ms_to_hf", "ms_to_hf_names", "ms_layout", "model_tensors", "expert_index",
           "canonical_entries", "validate_index", "convert_checkpoint", "copy_tokenizer_files", "merge_adapter_dir",
           "export_dtype", "finish_hf_export",
           "load_into_model", "save_model", "STORAGE"]
