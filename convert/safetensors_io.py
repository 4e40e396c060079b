"""A minimal safetensors reader and writer on numpy + ml_dtypes (bf16, fp8), without torch.

File format: 8-byte little-endian header length n, n bytes of JSON
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
data region; offsets are relative to the start of the data region, tensors are little-endian and C-ordered.

Reading memory-maps the file (`mmap` + numpy views of the data region, like `np.memmap`, but with the mapping
at hand for `madvise`), so `SafetensorsFile.slice(name, index)` / `read(name, index)` touch only the pages of
the requested slice, and `release()` drops the pages read so far from the process's resident memory. Offsets are checked against the file size when the file is opened: a truncated file is refused
with a message naming the file and the first tensor whose bytes are missing.

Writing (`write_sharded`) streams tensors one at a time from callbacks into shards of at most `max_shard_size`
bytes (a bigger tensor gets a shard of its own), named like transformers does (``model.safetensors``, or
``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``). Every file is first written to a
temporary name in the target directory and fsynced; only when all are complete are they renamed into place
(index last) and the directory fsynced. On any error the temporary files are removed, so no half-written
checkpoint remains.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import re
import struct
import uuid
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from convert.errors import ConversionError
from lolcats_jax.fsio import atomic_path, fsync_dir

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the official implementation's limit
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors name of a numpy dtype ("F32", "BF16", ...)."""
    dtype = np.dtype(dtype)
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ConversionError(f"dtype {dtype} has no safetensors equivalent; expected one of {sorted(DTYPES)}")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name
    shape: tuple[int, ...]
    begin: int  # offsets in the data region
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One .safetensors file, memory-mapped read-only; tensors are numpy views of the mapping (nothing is read
    until a view is indexed or copied)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata, self.tensors, header_len = _parse_header(self.path)
        self._data_start = 8 + header_len
        self._mmap: mmap.mmap | None = None
        self._data: np.ndarray | None = None
        size = self.path.stat().st_size - self._data_start
        if size > 0:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._data = np.frombuffer(self._mmap, dtype=np.uint8, count=size, offset=self._data_start)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise ConversionError(f"{self.path}: no tensor {name!r}")
        return self.tensors[name]

    def view(self, name: str) -> np.ndarray:
        """A read-only view of the whole tensor in the mapping."""
        t = self.info(name)
        dtype = DTYPES[t.dtype]
        if t.nbytes == 0 or self._data is None:
            return np.zeros(t.shape, dtype)
        return self._data[t.begin : t.end].view(dtype).reshape(t.shape)

    def slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """A view of `view(name)[index]`: copying it reads only that slice's pages."""
        return self.view(name)[index]

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """A copy of the tensor, or of the slice `index` only."""
        v = self.view(name)
        return np.array(v if index is None else v[index])

    def release(self) -> None:
        """Drops the pages read so far from this process's memory (they stay in the OS page cache), so that
        resident memory does not grow with the size of the file."""
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Forgets the mapping; it is unmapped once no view of it remains."""
        self._data = None
        self._mmap = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse_header(path: Path) -> tuple[dict[str, str], dict[str, TensorInfo], int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: not a safetensors file (only {len(head)} bytes, expected an 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise ConversionError(f"{path}: header length {n} exceeds the file size {size} (truncated or not safetensors)")
            raw = f.read(n)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dt, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
        if dt not in DTYPES:
            raise ConversionError(f"{path}: tensor {name!r} has unknown dtype {dt!r}; known: {sorted(DTYPES)}")
        want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize
        if not (0 <= begin <= end) or end - begin != want:
            raise ConversionError(
                f"{path}: tensor {name!r} has data_offsets [{begin}, {end}) but shape {list(shape)} {dt} needs {want} bytes"
            )
        tensors[name] = TensorInfo(name, dt, shape, int(begin), int(end))
    ordered = sorted(tensors.values(), key=lambda t: (t.begin, t.end))
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.begin < prev.end:
            raise ConversionError(f"{path}: tensors {prev.name!r} and {cur.name!r} overlap in the data region")
    for t in ordered:
        if t.end > data_len:
            raise ConversionError(
                f"{path}: file is truncated: tensor {t.name!r} needs bytes [{t.begin}, {t.end}) of the data region "
                f"but only {data_len} are present"
            )
    return dict(metadata), tensors, n


class SafetensorsDir:
    """The safetensors files of an HF model directory: `model.safetensors`, or the shards its
    `model.safetensors.index.json` lists (every listed tensor must be in the file the index names)."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index_path = self.dir / INDEX_FILE
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}  # tensor name -> file name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index_path}: not a valid safetensors index ({e!r})") from None
            for fname in sorted(set(weight_map.values())):
                if not (self.dir / fname).is_file():
                    raise ConversionError(f"{index_path}: lists {fname!r}, which is missing from {self.dir}")
                self.files[fname] = SafetensorsFile(self.dir / fname)
            for name, fname in weight_map.items():
                if name not in self.files[fname]:
                    raise ConversionError(f"{index_path}: tensor {name!r} is mapped to {fname!r}, which does not contain it")
            for fname, f in self.files.items():
                for name in f.keys():
                    if weight_map.get(name) != fname:
                        raise ConversionError(f"{self.dir / fname}: tensor {name!r} is not listed for this file in {INDEX_FILE}")
            self.where = dict(weight_map)
        elif (self.dir / SINGLE_FILE).is_file():
            self.files[SINGLE_FILE] = SafetensorsFile(self.dir / SINGLE_FILE)
            self.where = {name: SINGLE_FILE for name in self.files[SINGLE_FILE].keys()}
        else:
            others = sorted(p.name for p in self.dir.glob("*.bin")) if self.dir.is_dir() else []
            hint = f" (found {others}: PyTorch pickles are not supported, re-save with safetensors)" if others else ""
            raise ConversionError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    @property
    def file_names(self) -> list[str]:
        return list(self.files)

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def info(self, name: str) -> TensorInfo:
        return self.file_of(name).info(name)

    def file_of(self, name: str) -> SafetensorsFile:
        if name not in self.where:
            raise ConversionError(f"{self.dir}: no tensor {name!r} in {self.file_names}")
        return self.files[self.where[name]]

    def view(self, name: str) -> np.ndarray:
        return self.file_of(name).view(name)

    def slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self.file_of(name).slice(name, index)

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        return self.file_of(name).read(name, index)

    def release(self) -> None:
        for f in self.files.values():
            f.release()


# ------------------------------------------------------------------------------------------------ writing


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, shape and dtype, and a thunk producing its values when its turn comes."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    get: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "200MB", "20KiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ConversionError(f"cannot parse size {size!r}; expected e.g. 5GB, 200MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy in-order packing: a shard is closed when the next tensor would push it past `max_shard_size`."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": dtype_name(s.dtype), "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data region 8-byte aligned, as the official writer does
    return struct.pack("<Q", len(raw)) + raw


def _write_shard(path: Path, specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> None:
    """Writes one complete safetensors file at `path` (fsynced), producing each tensor only when it is written."""
    with open(path, "wb") as f:
        f.write(_header_bytes(specs, metadata))
        for s in specs:
            arr = np.asarray(s.get())
            if tuple(arr.shape) != tuple(s.shape) or arr.dtype != np.dtype(s.dtype):
                raise ConversionError(
                    f"{path.name}: tensor {s.name!r} produced shape {arr.shape} {arr.dtype}, expected {s.shape} {np.dtype(s.dtype)}"
                )
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())


def write_sharded(
    out_dir: str | os.PathLike,
    specs: Iterable[TensorSpec],
    *,
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Writes `specs` as HF-style safetensors shards (+ index when more than one) into `out_dir`.

    Returns the final paths (shards, then the index if any). Existing files of the same names are replaced."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = list(specs)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConversionError(f"duplicate tensor names {dup}")
    metadata = {"format": "pt", **(metadata or {})}
    shards = plan_shards(specs, parse_size(max_shard_size))
    n = len(shards)
    finals = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    tag = uuid.uuid4().hex[:8]
    temps = [out / f".{name}.tmp-{tag}" for name in finals]
    index_tmp = out / f".{INDEX_FILE}.tmp-{tag}"
    placed: list[Path] = []
    try:
        for shard, tmp in zip(shards, temps):
            _write_shard(tmp, shard, metadata)
        if n > 1:
            weight_map = {s.name: finals[k] for k, shard in enumerate(shards) for s in shard}
            index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
            with open(index_tmp, "w") as f:
                json.dump(index, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
        # everything is complete on disk: move it into place, the index last
        for tmp, name in zip(temps, finals):
            os.replace(tmp, out / name)
            placed.append(out / name)
        if n > 1:
            os.replace(index_tmp, out / INDEX_FILE)
            placed.append(out / INDEX_FILE)
        fsync_dir(out)
    except BaseException:
        for p in [*temps, index_tmp, *placed]:
            p.unlink(missing_ok=True)
        raise
    return placed


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Writes one safetensors file (atomically) from in-memory arrays."""
    path = Path(path)
    metadata = {"format": "pt", **(metadata or {})}
    specs = [TensorSpec(k, tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in tensors.items()]
    with atomic_path(path) as tmp:
        _write_shard(tmp, specs, metadata)
