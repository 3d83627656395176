"""The HF <-> MindSpore weight map of TeleChat2, defined once and used both ways, plus conversion,
validation from an index file, and loading/saving a TeleChatForCausalLM tensor by tensor.

HF names are the released torch names (transformer.h.{i}.self_attention.key_value.weight ...); MindSpore names
are those of the public MindSpore port (model.layers.{i}.attention.wk_v.weight ...). Layouts are identical
(MindFormers' Linear uses transpose_b and wk_v keeps the per-head interleaved [k_h; v_h] rows), so the map is a
pure rename: no tensor is ever transposed or re-ordered.
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
)
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
    """MindSpore (port) name of an HF tensor name; KeyError if it is not a TeleChat2 weight."""
    m = _HF_LAYER.match(name)
    if m:
        return f"model.layers.{m.group(1)}.{_HF2MS_LAYER[m.group(2)]}"
    return _HF2MS_GLOBAL[name]


def ms_to_hf(name: str) -> str:
    """HF name of a MindSpore (port) tensor name; KeyError if it is not a TeleChat2 weight."""
    m = _MS_LAYER.match(name)
    if m:
        return f"transformer.h.{m.group(1)}.{_MS2HF_LAYER[m.group(2)]}"
    return _MS2HF_GLOBAL[name]


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
    for e in entries:
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
            hf_name = name if naming == "hf" else ms_to_hf(name)
            ms_name = hf_to_ms(hf_name)
        except KeyError:
            raise CheckpointError(f"{index_path}: unknown tensor '{name}'") from None
        if hf_name not in expected:
            raise CheckpointError(f"{index_path}: tensor '{name}' is not a weight of the configured model")
        mapped.append((hf_name, ms_name))
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
    names = list(entries)
    out_names = names if target == "hf" else [hf_to_ms(n) for n in names]
    specs = [(out, entries[n].shape, dtype or entries[n].dtype) for n, out in zip(names, out_names)]

    def produce(i: int):
        e = entries[names[i]]
        if e.raw is not None and e.dtype == specs[i][2]:
            return e.raw  # same dtype: copy the bytes file to file, never through Python memory
        return convert_dtype(e.read(), e.dtype, specs[i][2])

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
    entries = canonical_entries(checkpoint_entries(path), model.config)
    for hf_name, e in entries.items():
        ms_name = hf_to_ms(hf_name)
        param = params.get(ms_name)
        if param is None:
            raise CheckpointError(f"{e.file}: tensor '{e.name}' has no parameter '{ms_name}' in the model")
        f32 = convert_dtype(e.read(), e.dtype, "float32")  # exact for every float source dtype
        param.set_data(ms.Tensor(f32, dtype=param.dtype))


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
    hf_names = list(cfg.parameter_shapes())
    dtype = dtype or cfg.param_dtype
    specs = [(n if fmt == "hf" else hf_to_ms(n), tuple(params[hf_to_ms(n)].shape), dtype) for n in hf_names]
    with atomic_output_dir(path, overwrite=True) as tmp:
        write_sharded_safetensors(tmp, specs, lambda i: parameter_array(params[hf_to_ms(hf_names[i])], dtype),
                                  parse_size(max_shard_size))
        if fmt == "hf":
            finish_hf_export(tmp, cfg, dtype)
        else:
            cfg.save_pretrained(tmp)
    return path


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LAYER_MAP", "GLOBAL_MAP", "TOKENIZER_FILES", "hf_to_ms", "ms_to_hf",
           "canonical_entries", "validate_index", "convert_checkpoint", "copy_tokenizer_files", "merge_adapter_dir",
           "export_dtype", "finish_hf_export",
           "load_into_model", "save_model", "STORAGE"]
