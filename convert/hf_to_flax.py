"""Load a Hugging Face Llama / Mistral safetensors directory straight into a sharded `Llama`.

    python -m convert.hf_to_flax --hf DIR --out CKPT_DIR [--mesh data=1,fsdp=-1,tensor=1] [--dtype bfloat16]

`load_hf_params` never holds the whole model on a host: the model is built abstractly (`nnx.eval_shape`), the
target sharding of every parameter comes from `lolcats_jax.sharding.param_shardings`, and each array is created
with `jax.make_array_from_callback`, whose callback reads (memory-mapped) only the HF rows/columns covering the
index a device owns: per layer of a stacked parameter, and per head range for q/k/v/o (see `convert.keymap`).
In a multi-process run each process therefore reads only the slices of its own devices.

Everything is checked before any array is created: the architecture (`config.json`), every expected tensor
present, none unexpected (``*.rotary_emb.inv_freq`` is ignored, as is ``lm_head.weight`` of a tied model, which
transformers sometimes saves as a copy of the embedding), shapes as the config implies, float dtypes. Problems
raise `ConversionError` naming the file and the tensor; the command line prints ``error: ...`` and exits with 2.

Parameters that are not in an HF checkpoint (LoLCATS feature maps and window logits, LoRA adapters, present when
`ModelOptions` asks for them) get their fresh initialisation (`Llama(..., rngs=nnx.Rngs(seed))`), computed by one
jitted function with `out_shardings` that returns only those parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from convert.errors import ConversionError
from convert.keymap import Index, ParamMap, expected_hf_shapes, is_ignored, param_maps
from convert.safetensors_io import FLOAT_DTYPES, SafetensorsDir
from lolcats_jax import sharding as shd
from lolcats_jax.cli import command
from lolcats_jax.model import Llama, LlamaConfig, ModelOptions, UnsupportedModelError
from lolcats_jax.model.options import to_dtype

_log = logging.getLogger("lolcats_jax.load")

NnxPath = tuple[str, ...]  # a parameter path in the nnx state, e.g. ("layers", "wq")


def read_config(model_dir: str | Path) -> LlamaConfig:
    """The model's architecture from `model_dir/config.json`; unsupported ones raise ConversionError."""
    try:
        return LlamaConfig.from_hf_dir(model_dir)
    except (UnsupportedModelError, FileNotFoundError, ValueError) as e:
        where = str(Path(model_dir) / "config.json")
        raise ConversionError(str(e) if where in str(e) else f"{where}: {e}") from None


def validate(cfg: LlamaConfig, files: SafetensorsDir) -> None:
    """Checks names, shapes and dtypes of every tensor against what `cfg` implies, before anything is loaded."""
    expected = expected_hf_shapes(cfg)
    where = f"{files.dir} ({', '.join(files.file_names)})"
    missing = [n for n in expected if n not in files]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConversionError(f"{where}: missing tensor(s) {missing[:5]}{more}")
    tolerated = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = [n for n in files.keys() if n not in expected and not is_ignored(n) and n not in tolerated]
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ConversionError(f"{where}: unexpected tensor(s) {unexpected[:5]}{more} for a {cfg.model_type} model")
    for name, shape in expected.items():
        info = files.info(name)
        path = files.dir / files.where[name]
        if info.shape != shape:
            raise ConversionError(f"{path}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)} from config.json")
        if info.dtype not in FLOAT_DTYPES:
            raise ConversionError(f"{path}: tensor {name!r} has dtype {info.dtype}, expected a float type {FLOAT_DTYPES}")


def _single_device_mesh() -> jax.sharding.Mesh:
    return shd.make_mesh(shd.MeshShape(1, 1, 1), devices=jax.devices()[:1])


def _make_array(pm: ParamMap, files: SafetensorsDir, sharding: jax.sharding.NamedSharding, dtype: np.dtype) -> jax.Array:
    """One parameter as a sharded array; each device's shard is read from its slices of the HF tensors."""
    cache: dict[tuple, np.ndarray] = {}  # replicas of the same shard are read once

    def callback(index: Index) -> np.ndarray:
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:
            cache[key] = pm.read(files.slice, index, dtype)
        return cache[key]

    try:
        return jax.make_array_from_callback(pm.shape, sharding, callback)
    finally:
        files.release()


def load_hf_params(
    model_dir: str | Path,
    mesh: jax.sharding.Mesh | None = None,
    *,
    param_dtype: str = "bfloat16",
    opts: ModelOptions | None = None,
    seed: int = 0,
    base_cache: dict | None = None,
) -> Llama:
    """A `Llama` whose base weights come from the HF directory `model_dir`, sharded over `mesh` (default: the first
    device alone) and cast to `param_dtype` (which overrides `opts.param_dtype`); other parameters are freshly
    initialised from `seed`. With `base_cache` (a dict the caller keeps), the base weights are read once and shared
    by every model built with the same directory, dtype and mesh (e.g. teacher, linearized and LoRA models of one
    evaluation: the arrays are immutable, so sharing them is safe)."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    opts = dataclasses.replace(opts or ModelOptions(), param_dtype=param_dtype)
    mesh = mesh if mesh is not None else _single_device_mesh()
    dtype = np.dtype(to_dtype(param_dtype))
    cache_key = (str(model_dir.resolve()), str(dtype), mesh)
    cached = base_cache is not None and cache_key in base_cache
    if not cached:
        files = SafetensorsDir(model_dir)
        validate(cfg, files)

    abstract = nnx.eval_shape(lambda: Llama(cfg, opts, rngs=nnx.Rngs(seed)))
    graphdef, abs_state = nnx.split(abstract)
    shardings = dict(nnx.to_flat_state(shd.param_shardings(abs_state, mesh)))
    maps = {pm.path: pm for pm in param_maps(cfg)}
    flat = dict(nnx.to_flat_state(abs_state))
    base_paths = {p for p, v in flat.items() if type(v) is nnx.Param}
    if base_paths != set(maps):
        raise AssertionError(f"model base parameters {sorted(base_paths)} differ from the key map {sorted(maps)}")

    if cached:
        values = dict(base_cache[cache_key])
    else:
        values = _read_base(model_dir, files, maps, flat, shardings, dtype, param_dtype)
        if base_cache is not None:
            base_cache[cache_key] = dict(values)
    values.update(_init_extra(cfg, opts, seed, abstract, set(flat) - base_paths, mesh))
    new_state = nnx.from_flat_state([(p, flat[p].replace(values[p])) for p in flat])
    return nnx.merge(graphdef, new_state)


def _read_base(model_dir: Path, files: SafetensorsDir, maps: dict, flat: dict, shardings: dict, dtype: np.dtype,
               param_dtype: str) -> dict:
    """The base weights as arrays on their shardings, with progress lines."""
    values: dict[NnxPath, jax.Array] = {}
    total = sum(math.prod(pm.shape) for pm in maps.values()) * dtype.itemsize
    done, t0 = 0, time.perf_counter()
    say = _log.info if jax.process_index() == 0 else (lambda *a: None)
    say("loading %s: %d stacked tensors, %.2f GiB as %s", model_dir, len(maps), total / 2**30, param_dtype)
    for path, pm in maps.items():
        want = flat[path].get_value()
        if tuple(want.shape) != pm.shape:
            raise AssertionError(f"{'.'.join(path)}: model shape {want.shape} != key map shape {pm.shape}")
        values[path] = _make_array(pm, files, shardings[path], dtype)
        done += math.prod(pm.shape) * dtype.itemsize
        if total >= 2**30:  # big models: a line per stacked tensor, so minutes of loading are never silent
            say("  %-28s %5.1f%% (%.0f s)", ".".join(map(str, path)), 100 * done / total, time.perf_counter() - t0)
    say("loaded %s in %.1f s", model_dir.name, time.perf_counter() - t0)
    return values


def _init_extra(cfg: LlamaConfig, opts: ModelOptions, seed: int, abstract: Llama, paths: set, mesh) -> dict:
    """Fresh values of the non-HF parameters `paths`, initialised on device with their target shardings."""
    if not paths:
        return {}
    keep = lambda path, _v: tuple(path) in paths  # noqa: E731
    out_shardings = shd.param_shardings(nnx.state(abstract, keep), mesh)
    init = jax.jit(lambda: nnx.state(Llama(cfg, opts, rngs=nnx.Rngs(seed)), keep), out_shardings=out_shardings)
    return {p: v.get_value() for p, v in nnx.to_flat_state(init())}


# ---------------------------------------------------------------------------------------------------- CLI


def parse_mesh(text: str) -> shd.MeshShape:
    """"data=1,fsdp=-1,tensor=1" → MeshShape (omitted axes keep their defaults)."""
    try:
        return shd.parse_mesh_shape(text)
    except ValueError as e:
        raise ConversionError(f"--mesh: {e}") from None


@command
def main(argv: Sequence[str] | None = None) -> int:
    from convert.checkpoint import save_checkpoint

    ap = argparse.ArgumentParser(prog="python -m convert.hf_to_flax", description=__doc__.splitlines()[0])
    ap.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="Orbax checkpoint directory to create")
    ap.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1", help="mesh axis sizes, -1 = the remaining devices")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="parameter dtype")
    args = ap.parse_args(argv)
    try:
        mesh = shd.make_mesh(parse_mesh(args.mesh))
    except ValueError as e:
        raise ConversionError(str(e)) from None
    t0 = time.perf_counter()
    model = load_hf_params(args.hf, mesh, param_dtype=args.dtype)
    t1 = time.perf_counter()
    path = save_checkpoint(model, args.out)
    print(f"loaded {args.hf} in {t1 - t0:.1f} s, saved {path} in {time.perf_counter() - t1:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
