"""Load a linearized Hugging Face directory written by `convert.to_hf` (model_type "lolcats_llama") back into JAX.

    python -m convert.from_hf --hf DIR --out CKPT_DIR [--mesh data=1,fsdp=-1,tensor=1] [--dtype float32]

`load_linearized(DIR)` returns a `Llama` whose layers are linearized as the `lolcats` section of config.json says.
LoRA was merged into the projections on export, so the model has no LoRA parameters and its base weights are the
merged ones, read bit for bit (in the file's dtype unless `param_dtype` says otherwise); feature maps and window
logits are float32. Base weights are read slice-wise onto their shards like `convert.hf_to_flax` does. Every
tensor is checked first (missing, unexpected, wrong shape, non-float): `ConversionError` names the file and key.
The command line saves the result as a `convert.checkpoint` Orbax checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from convert.errors import ConversionError
from convert.hf_to_flax import _make_array, _single_device_mesh, parse_mesh
from convert.keymap import expected_hf_shapes, is_ignored, param_maps
from convert.safetensors_io import DTYPES, FLOAT_DTYPES, SafetensorsDir
from convert.to_hf import MODEL_TYPE, lolcats_hf_names
from lolcats_jax import sharding as shd
from lolcats_jax.cli import command
from lolcats_jax.model import Llama, LlamaConfig, LolcatsLayerOptions, ModelOptions, UnsupportedModelError
from lolcats_jax.model.llama_config import ARCHITECTURES

_OPTION_KEYS = ("form", "window", "window_size", "feature_map", "fullspace", "feature_dim", "feature_bias", "eps",
                "affine", "compat")


def read_linearized_config(model_dir: str | Path) -> tuple[LlamaConfig, ModelOptions]:
    """(architecture, options without dtype) of a lolcats_llama directory."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found (expected a directory written by convert.to_hf)") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if raw.get("model_type") != MODEL_TYPE or not isinstance(raw.get("lolcats"), dict):
        raise ConversionError(f"{path}: model_type={raw.get('model_type')!r} with no 'lolcats' section; expected "
                              f"{MODEL_TYPE!r} (a plain Llama loads with convert.hf_to_flax)")
    section = raw["lolcats"]
    llama = {k: v for k, v in raw.items() if k not in ("lolcats", "auto_map")}
    family = section.get("base_model_type") or "llama"
    if family not in ARCHITECTURES:
        raise ConversionError(f"{path}: lolcats.base_model_type={family!r} must be one of {sorted(ARCHITECTURES)}")
    llama.update(model_type=family, architectures=[ARCHITECTURES[family]])
    try:
        cfg = LlamaConfig.from_hf_dict(llama, source=str(path))
    except UnsupportedModelError as e:
        raise ConversionError(str(e)) from None
    missing = [k for k in _OPTION_KEYS if k not in section]
    if missing:
        raise ConversionError(f"{path}: lolcats section lacks {missing}")
    kinds = section.get("layer_kinds") or ["lolcats"] * cfg.num_layers
    if len(kinds) != cfg.num_layers or any(k not in ("lolcats", "softmax") for k in kinds):
        raise ConversionError(f"{path}: lolcats.layer_kinds={kinds!r} must name 'lolcats'/'softmax' for each of "
                              f"the {cfg.num_layers} layers")
    try:
        lo = LolcatsLayerOptions(**{k: section[k] for k in _OPTION_KEYS})
        lo.spec()  # validates the values
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{path}: invalid lolcats section ({e})") from None
    return cfg, ModelOptions(remat=False, layer_kinds=tuple(kinds), lolcats=lo, lora=None)


def _lolcats_shapes(cfg: LlamaConfig, opts: ModelOptions) -> dict[str, tuple[str, int, tuple[int, ...]]]:
    """HF name → (our parameter, index among the linearized layers, shape) of every lolcats tensor expected."""
    lo, H, D = opts.lolcats, cfg.num_heads, cfg.head_dim
    params = {"fmap_q": (H, D, lo.feature_dim), "fmap_k": (H, D, lo.feature_dim), "window_logit": (H,)}
    if lo.feature_bias:
        params.update(fbias_q=(H,), fbias_k=(H,))
    out = {}
    lin = [i for i, k in enumerate(opts.kinds(cfg.num_layers)) if k == "lolcats"]
    for n, layer in enumerate(lin):
        names = lolcats_hf_names(layer)
        for p, shape in params.items():
            out[names[p]] = (p, n, shape)
    return out


def validate(cfg: LlamaConfig, opts: ModelOptions, files: SafetensorsDir) -> None:
    """Every expected tensor present with its shape and a float dtype, nothing else."""
    expected = {**expected_hf_shapes(cfg), **{k: v[2] for k, v in _lolcats_shapes(cfg, opts).items()}}
    where = f"{files.dir} ({', '.join(files.file_names)})"
    missing = [n for n in expected if n not in files]
    if missing:
        raise ConversionError(f"{where}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    tolerated = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = [n for n in files.keys() if n not in expected and not is_ignored(n) and n not in tolerated]
    if unexpected:
        raise ConversionError(f"{where}: unexpected tensor(s) {unexpected[:5]} for this lolcats_llama config")
    for name, shape in expected.items():
        info = files.info(name)
        path = files.dir / files.where[name]
        if info.shape != tuple(shape):
            raise ConversionError(f"{path}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)}")
        if info.dtype not in FLOAT_DTYPES:
            raise ConversionError(f"{path}: tensor {name!r} has dtype {info.dtype}, expected a float type")


def load_linearized(model_dir: str | Path, mesh: jax.sharding.Mesh | None = None, *,
                    param_dtype: str | None = None) -> Llama:
    """The linearized `Llama` of a directory written by `convert.to_hf` (format hf), sharded over `mesh`."""
    model_dir = Path(model_dir)
    cfg, opts = read_linearized_config(model_dir)
    files = SafetensorsDir(model_dir)
    validate(cfg, opts, files)
    if param_dtype is None:
        param_dtype = np.dtype(DTYPES[files.info("model.embed_tokens.weight").dtype]).name
    opts = dataclasses.replace(opts, param_dtype=param_dtype)
    mesh = mesh if mesh is not None else _single_device_mesh()
    dtype = np.dtype(jax.numpy.dtype(param_dtype))

    abstract = nnx.eval_shape(lambda: Llama(cfg, opts, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    shardings = dict(nnx.to_flat_state(shd.param_shardings(abs_state, mesh)))
    flat = dict(nnx.to_flat_state(abs_state))
    values = {pm.path: _make_array(pm, files, shardings[pm.path], dtype) for pm in param_maps(cfg)}
    stacks: dict[str, np.ndarray] = {}
    for name, (param, n, _shape) in _lolcats_shapes(cfg, opts).items():
        arr = files.file_of(name).read(name).astype(np.float32)
        stacks.setdefault(param, np.zeros(flat[("lolcats", param)].get_value().shape, np.float32))[n] = arr
    for param, arr in stacks.items():
        values[("lolcats", param)] = jax.device_put(arr, shardings[("lolcats", param)])
    left = set(flat) - set(values)
    if left:
        raise AssertionError(f"parameters without a source: {sorted(left)}")
    state = nnx.from_flat_state([(p, flat[p].replace(values[p])) for p in flat])
    return nnx.merge(graphdef, state)


@command
def main(argv: Sequence[str] | None = None) -> int:
    from convert.checkpoint import save_checkpoint

    ap = argparse.ArgumentParser(prog="python -m convert.from_hf", description=__doc__.splitlines()[0])
    ap.add_argument("--hf", required=True, help="directory written by python -m convert.to_hf")
    ap.add_argument("--out", required=True, help="Orbax checkpoint directory to create")
    ap.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1", help="mesh axis sizes, -1 = the remaining devices")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the file's")
    args = ap.parse_args(argv)
    try:
        mesh = shd.make_mesh(parse_mesh(args.mesh))
    except ValueError as e:
        raise ConversionError(str(e)) from None
    model = load_linearized(args.hf, mesh, param_dtype=args.dtype)
    print(f"saved {save_checkpoint(model, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
