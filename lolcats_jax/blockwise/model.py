"""The block model: a `Llama` of only a block's k layers, loaded from the HF directory slice by slice.

Notation: L layers of the full model, k layers of the block, N linearized layers of the full model, E hidden, H
heads, D head dim, F feature dim.

The block model is the project's `Llama` with `num_layers = k` and a one-row embedding (never used: its input is
the stored residual stream); only the HF tensors of layers [start, stop) are read, each device reading only the
slice it owns (as `convert.hf_to_flax` does for the whole model). Its feature maps and window factors are the
full model's initialisation restricted to the block (one jitted init of the full model whose unused parameters
XLA drops), so a block trains from exactly the parameters the joint stage would start from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from convert.errors import ConversionError
from convert.keymap import ParamMap, expected_hf_shapes, layer_param_map, layer_table
from convert.safetensors_io import FLOAT_DTYPES, SafetensorsDir
from lolcats_jax import sharding as shd
from lolcats_jax.blockwise.layout import Block
from lolcats_jax.config import Config
from lolcats_jax.errors import UserError
from lolcats_jax.model.build import model_options
from lolcats_jax.model.llama import FeatureMapParam, Llama, WindowParam
from lolcats_jax.model.llama_config import LlamaConfig
from lolcats_jax.model.options import ModelOptions, to_dtype
from lolcats_jax.train.step import path_key


def full_options(cfg: Config, llama_cfg: LlamaConfig) -> ModelOptions:
    """The options of the linearized full model (as the joint `distill` stage builds it)."""
    opts = model_options(cfg, llama_cfg.num_layers, linearize=True)
    return dataclasses.replace(opts, param_dtype=cfg.model.param_dtype)


def block_config(llama_cfg: LlamaConfig, block: Block) -> LlamaConfig:
    """The architecture of a block: k layers, a one-token tied embedding (unused)."""
    return dataclasses.replace(llama_cfg, num_layers=block.size, vocab_size=1, tie_embeddings=True)


def block_options(cfg: Config, llama_cfg: LlamaConfig, block: Block) -> ModelOptions:
    full = full_options(cfg, llama_cfg)
    return dataclasses.replace(full, layer_kinds=full.layer_kinds[block.start : block.stop])


def is_attention_param(path, var) -> bool:
    return isinstance(var, (FeatureMapParam, WindowParam))


def attention_keys(cfg: Config, llama_cfg: LlamaConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of the full model's trainable attention parameters (what distill/final holds)."""
    opts = full_options(cfg, llama_cfg)
    abstract = nnx.eval_shape(lambda: Llama(llama_cfg, opts, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, is_attention_param))
    return {path_key(p): (tuple(v.get_value().shape), np.dtype(v.get_value().dtype)) for p, v in flat}


def initial_attention(cfg: Config, llama_cfg: LlamaConfig, block: Block, seed: int, out_shardings=None) -> dict[str, jax.Array]:
    """The joint model's initial feature maps / window logits of the block's linearized layers ({key: (n, …)}),
    placed on `out_shardings` ({key: sharding}) when given."""
    opts = full_options(cfg, llama_cfg)
    lo, hi = block.lin_start, block.lin_stop

    def init():
        state = nnx.state(Llama(llama_cfg, opts, rngs=nnx.Rngs(seed)), is_attention_param)
        return {path_key(p): v.get_value()[lo:hi] for p, v in nnx.to_flat_state(state)}

    return jax.jit(init, out_shardings=out_shardings)()


def _check_tensors(files: SafetensorsDir, llama_cfg: LlamaConfig, names: list[str]) -> None:
    expected = expected_hf_shapes(llama_cfg)
    missing = [n for n in names if n not in files]
    if missing:
        raise ConversionError(f"{files.dir}: missing tensor(s) {missing[:5]}{' …' if len(missing) > 5 else ''}")
    for name in names:
        info = files.info(name)
        if info.shape != expected[name]:
            raise ConversionError(f"{files.dir / files.where[name]}: tensor {name!r} has shape {list(info.shape)}, expected {list(expected[name])}")
        if info.dtype not in FLOAT_DTYPES:
            raise ConversionError(f"{files.dir / files.where[name]}: tensor {name!r} has dtype {info.dtype}, expected a float type")


def _sliced_array(pm: ParamMap, files: SafetensorsDir, sharding, dtype: np.dtype) -> jax.Array:
    def callback(index):
        return pm.read(files.slice, index, dtype)

    try:
        return jax.make_array_from_callback(pm.shape, sharding, callback)
    finally:
        files.release()


def _constant(shape: tuple[int, ...], dtype, value: float, sharding) -> jax.Array:
    return jax.make_array_from_callback(tuple(shape), sharding, lambda idx: np.full(tuple(shape), value, np.dtype(dtype))[idx])


def load_block_model(cfg: Config, llama_cfg: LlamaConfig, block: Block, mesh: jax.sharding.Mesh, *, init_attention: bool = True) -> Llama:
    """The block's k layers from `cfg.model.path` (never the rest of the model), sharded over `mesh`, with the
    joint model's initial attention parameters for its linearized layers (`init_attention`)."""
    model_dir = Path(cfg.model.path)
    bcfg, bopts = block_config(llama_cfg, block), block_options(cfg, llama_cfg, block)
    files = SafetensorsDir(model_dir)
    dtype = np.dtype(to_dtype(cfg.model.param_dtype))
    abstract = nnx.eval_shape(lambda: Llama(bcfg, bopts, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(abs_state))
    shardings = dict(nnx.to_flat_state(shd.param_shardings(abs_state, mesh)))

    values: dict[tuple, jax.Array] = {}
    for name in layer_table(llama_cfg):
        pm = layer_param_map(llama_cfg, name, range(block.start, block.stop))
        _check_tensors(files, llama_cfg, list(pm.hf_names))
        values[("layers", name)] = _sliced_array(pm, files, shardings[("layers", name)], dtype)
    for path, fill in ((("embed",), 0.0), (("final_norm",), 1.0)):  # unused by a block; filled for completeness
        values[path] = _constant(flat[path].get_value().shape, dtype, fill, shardings[path])
    attn_paths = [p for p, v in flat.items() if is_attention_param(p, v)]
    if attn_paths and init_attention:
        init = initial_attention(cfg, llama_cfg, block, cfg.run.seed, {path_key(p): shardings[p] for p in attn_paths})
        values.update({p: init[path_key(p)] for p in attn_paths})
    elif attn_paths:
        values.update({p: _constant(flat[p].get_value().shape, flat[p].get_value().dtype, 0.0, shardings[p]) for p in attn_paths})
    unknown = sorted(path_key(p) for p in flat if p not in values)
    if unknown:
        raise UserError(f"block model: parameters {unknown} have no source (LoRA is not supported in distill_block)")
    state = nnx.from_flat_state([(p, flat[p].replace(values[p])) for p in flat])
    return nnx.merge(graphdef, state)
