"""Streaming checkpoint readers and writers: safetensors (parsed by hand so bf16 and partial reads need no
framework), torch .bin (mmap), MindSpore .ckpt; and exact dtype conversion on numpy arrays.

Arrays travel as numpy; bfloat16 is carried as its raw uint16 bit pattern so that round trips are bit-exact.
Readers touch one tensor at a time, so converting a 450 GB checkpoint needs memory for one tensor, not the model.
"""
from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from telechat_ms.errors import CheckpointError
from telechat_ms.io import read_json_object

# safetensors dtype tag -> (our name, numpy storage dtype)
_ST_DTYPES = {
    "F64": ("float64", np.float64), "F32": ("float32", np.float32), "F16": ("float16", np.float16),
    "BF16": ("bfloat16", np.uint16), "I64": ("int64", np.int64), "I32": ("int32", np.int32),
    "I16": ("int16", np.int16), "I8": ("int8", np.int8), "U8": ("uint8", np.uint8), "BOOL": ("bool", np.bool_),
}
_NAME_TO_ST = {ours: tag for tag, (ours, _) in _ST_DTYPES.items()}
STORAGE = {ours: np_dtype for ours, np_dtype in _ST_DTYPES.values()}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_MAX_HEADER = 100 * 1024 * 1024


def itemsize(dtype: str) -> int:
    return np.dtype(STORAGE[dtype]).itemsize


def numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------------------------------- dtypes
def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch and MindSpore do; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded).astype(np.uint16)


_CHUNK = 1 << 22  # elements converted at a time: bounds the temporaries to a few tens of MB


def convert_dtype(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert an array stored as `src` into storage of `dst` (bf16 = uint16 bits). Same dtype: returned as is.

    Works chunk by chunk into a preallocated output, so peak memory is the input + the output + a constant.
    """
    if src == dst:
        return arr
    if src not in FLOAT_DTYPES or dst not in FLOAT_DTYPES:
        raise CheckpointError(f"cannot convert {src} to {dst}: only float32/float16/bfloat16 weights convert")
    flat = np.ascontiguousarray(arr).reshape(-1)
    out = np.empty(flat.shape, dtype=STORAGE[dst])
    for start in range(0, flat.size, _CHUNK):
        part = flat[start:start + _CHUNK]
        f32 = _bf16_bits_to_f32(part) if src == "bfloat16" else part.astype(np.float32)
        out[start:start + _CHUNK] = _f32_to_bf16_bits(f32) if dst == "bfloat16" else f32
    return out.reshape(arr.shape)


# ---------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class ByteRange:
    """Bytes [offset, offset + nbytes) of a file: a tensor that can be copied without decoding it."""

    path: str
    offset: int
    nbytes: int


@dataclass
class TensorEntry:
    """One tensor of a checkpoint: where it lives and how to read it (without reading it yet)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str
    read: Callable[[], np.ndarray]
    raw: ByteRange | None = None   # set when the stored bytes are the tensor in C order (safetensors)

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """(header dict, data start offset); validates that every tensor lies inside the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, "
                                  f"file of {size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        expected = numel(info["shape"]) * np.dtype(_ST_DTYPES[info["dtype"]][1]).itemsize
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor '{name}' has {end - begin} bytes, its shape {info['shape']} "
                                  f"and dtype {info['dtype']} need {expected}")
        if start + end > size:
            raise CheckpointError(f"{path}: truncated file: tensor '{name}' needs bytes up to {start + end}, "
                                  f"the file has {size}")
    return header, start


def safetensors_entries(path: str) -> list[TensorEntry]:
    header, start = read_safetensors_header(path)
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ours, storage = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])

        def read(begin=begin, end=end, storage=storage, shape=shape) -> np.ndarray:
            with open(path, "rb") as fh:
                fh.seek(start + begin)
                buf = bytearray(end - begin)
                if fh.readinto(buf) != end - begin:
                    raise CheckpointError(f"{path}: truncated while reading tensor data")
            return np.frombuffer(buf, dtype=storage).reshape(shape)

        entries.append(TensorEntry(name, shape, ours, path, read, ByteRange(path, start + begin, end - begin)))
    return entries


def copy_range(src: ByteRange, out) -> None:
    """Append src's bytes to the open file `out`: in-kernel (copy_file_range) where possible, else chunked."""
    out.flush()
    done = 0
    with open(src.path, "rb") as fh:
        if hasattr(os, "copy_file_range"):
            try:
                while done < src.nbytes:
                    n = os.copy_file_range(fh.fileno(), out.fileno(), src.nbytes - done, src.offset + done)
                    if n == 0:
                        break
                    done += n
            except OSError:
                pass  # e.g. across file systems that refuse it: fall through to plain copying
        out.seek(0, os.SEEK_END)
        fh.seek(src.offset + done)
        while done < src.nbytes:
            chunk = fh.read(min(64 << 20, src.nbytes - done))
            if not chunk:
                raise CheckpointError(f"{src.path}: truncated while copying tensor data")
            out.write(chunk)
            done += len(chunk)


_TORCH_DTYPES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16",
                 "torch.float64": "float64", "torch.int64": "int64", "torch.int32": "int32"}


def torch_bin_entries(path: str) -> list[TensorEntry]:
    """Entries of a pytorch_model*.bin, loaded with weights_only=True and mmap (no full copy in memory)."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise CheckpointError(f"{path}: reading .bin checkpoints needs torch (pip install 'telechat_ms[torch]')") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read torch checkpoint ({exc})") from exc
    entries = []
    for name, tensor in state.items():
        dtype = _TORCH_DTYPES.get(str(tensor.dtype))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {tensor.dtype}")

        def read(tensor=tensor, dtype=dtype) -> np.ndarray:
            if dtype == "bfloat16":
                return tensor.contiguous().view(torch.int16).numpy().view(np.uint16).copy()
            return tensor.contiguous().numpy().copy()

        entries.append(TensorEntry(name, tuple(tensor.shape), dtype, path, read))
    return entries


def ms_ckpt_entries(path: str) -> list[TensorEntry]:
    """Entries of a MindSpore .ckpt (the public port's format); MindSpore reads the file whole."""
    import mindspore as ms
    try:
        params = ms.load_checkpoint(path)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read MindSpore checkpoint ({exc})") from exc
    names = {ms.float32: "float32", ms.float16: "float16", ms.bfloat16: "bfloat16"}
    entries = []
    for name, param in params.items():
        dtype = names.get(param.dtype)
        if dtype is None:
            continue  # step counters and other scalars of a training checkpoint

        def read(param=param, dtype=dtype) -> np.ndarray:
            f32 = param.astype(ms.float32).asnumpy()
            return convert_dtype(f32, "float32", dtype)

        entries.append(TensorEntry(name, tuple(param.shape), dtype, path, read))
    return entries


def _entries_of_file(path: str) -> list[TensorEntry]:
    if path.endswith(".safetensors"):
        return safetensors_entries(path)
    if path.endswith(".bin") or path.endswith(".pt"):
        return torch_bin_entries(path)
    if path.endswith(".ckpt"):
        return ms_ckpt_entries(path)
    raise CheckpointError(f"{path}: unknown checkpoint file type (expected .safetensors, .bin or .ckpt)")


def checkpoint_files(path: str) -> list[str]:
    """The weight files of a checkpoint directory (via its index when present), or [path] for a file."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            weight_map = load_index(index)["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise CheckpointError(f"{index}: lists shard {missing[0]} which does not exist in {path}")
            return [os.path.join(path, f) for f in files]
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.ckpt"):
        files = sorted(glob.glob(os.path.join(path, pattern)))
        if files:
            return files
    raise CheckpointError(f"{path}: no weights found (*.safetensors, pytorch_model*.bin or *.ckpt)")


def load_index(index_path: str) -> dict:
    index = read_json_object(index_path, CheckpointError)
    if not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{index_path}: missing 'weight_map'")
    return index


def checkpoint_entries(path: str) -> list[TensorEntry]:
    """Every tensor of a checkpoint (directory or file), without reading data; duplicate names are an error."""
    seen: dict[str, str] = {}
    entries = []
    for file in checkpoint_files(path):
        for entry in _entries_of_file(file):
            if entry.name in seen:
                raise CheckpointError(f"tensor '{entry.name}' appears in both {seen[entry.name]} and {file}")
            seen[entry.name] = file
            entries.append(entry)
    return entries


# ---------------------------------------------------------------------------------------------- writing
def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '10KB' / int bytes -> bytes (decimal units, as HF uses)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def plan_shards(specs: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int) -> list[list[int]]:
    """Group tensors (in order) into shards of at most max_shard_bytes (a bigger tensor gets its own shard)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(specs):
        nbytes = numel(shape) * itemsize(dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _header_bytes(specs: list[tuple[str, tuple[int, ...], str]], metadata: dict | None) -> bytes:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = numel(shape) * itemsize(dtype)
        header[name] = {"dtype": _NAME_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def write_sharded_safetensors(out_dir: str, specs: list[tuple[str, tuple[int, ...], str]],
                              produce: Callable[[int], np.ndarray], max_shard_bytes: int,
                              prefix: str = "model", progress=None) -> dict:
    """Stream tensors into shards `prefix-0000k-of-0000n.safetensors` (+ index when n > 1); returns the index.

    `produce(i)` returns the storage array of specs[i], or a ByteRange to copy as is; it is called once per
    tensor, in order, so at most one tensor is held in memory at a time.
    """
    shards = plan_shards(specs, max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k, members in enumerate(shards, start=1):
        fname = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{k:05d}-of-{n:05d}.safetensors"
        shard_specs = [specs[i] for i in members]
        with open(os.path.join(out_dir, fname), "wb") as fh:
            fh.write(_header_bytes(shard_specs, None))
            for i in members:
                name, shape, dtype = specs[i]
                data = produce(i)
                if isinstance(data, ByteRange):
                    if data.nbytes != numel(shape) * itemsize(dtype):
                        raise CheckpointError(f"tensor '{name}': {data.nbytes} source bytes, planned "
                                              f"{dtype}{list(shape)}")
                    copy_range(data, fh)
                    weight_map[name] = fname
                    total += data.nbytes
                    if progress is not None:
                        progress.update(data.nbytes)
                    continue
                arr = np.ascontiguousarray(data)
                if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(STORAGE[dtype]):
                    raise CheckpointError(f"tensor '{name}': produced {arr.dtype}{list(arr.shape)}, "
                                          f"planned {dtype}{list(shape)}")
                fh.write(memoryview(arr).cast("B"))
                weight_map[name] = fname
                total += arr.nbytes
                if progress is not None:
                    progress.update(arr.nbytes)
            fh.flush()
            os.fsync(fh.fileno())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if n > 1:
        with open(os.path.join(out_dir, f"{prefix}.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)
            fh.write("\n")
    return index


def assign_from_safetensors(path: str, params: dict, what: str = "model", strict: bool = True) -> None:
    """Set MindSpore parameters {name: Parameter} from a safetensors file; every one must be there with its
    shape (and, when strict, the file may hold nothing else). Values pass through fp32, exact for float dtypes."""
    import mindspore as ms
    entries = {e.name: e for e in safetensors_entries(path)}
    missing = [n for n in params if n not in entries]
    if missing:
        raise CheckpointError(f"{path}: {what} tensor '{missing[0]}' is missing ({len(missing)} in all)")
    extra = sorted(set(entries) - set(params))
    if strict and extra:
        raise CheckpointError(f"{path}: unexpected {what} tensor '{extra[0]}' ({len(extra)} in all)")
    for name, param in params.items():
        e = entries[name]
        if tuple(e.shape) != tuple(param.shape):
            raise CheckpointError(f"{path}: {what} tensor '{name}' has shape {list(e.shape)}, "
                                  f"expected {list(param.shape)}")
        param.set_data(ms.Tensor(convert_dtype(e.read(), e.dtype, "float32"), dtype=param.dtype))
