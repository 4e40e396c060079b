"""Building models: options from the run config, sharded random init, and placing a model onto a mesh."""

from __future__ import annotations

import jax
from flax import nnx

from lolcats_jax.config import Config, LoraConfig
from lolcats_jax.model.llama import Llama
from lolcats_jax.model.llama_config import LlamaConfig
from lolcats_jax.model.options import LolcatsLayerOptions, LoraOptions, ModelOptions
from lolcats_jax.sharding import param_shardings


def model_options(cfg: Config, num_layers: int, *, lora: LoraConfig | None = None, linearize: bool | None = None) -> ModelOptions:
    """ModelOptions for `cfg`: linearized layers when attention.kind is lolcats (unless `linearize` says otherwise)."""
    a = cfg.attention
    if linearize is None:
        linearize = a.kind == "lolcats"
    for i in a.softmax_layers:
        if not 0 <= i < num_layers:
            raise ValueError(f"attention.softmax_layers contains {i}, but the model has layers 0..{num_layers - 1}")
    kinds = tuple("softmax" if (not linearize or i in a.softmax_layers) else "lolcats" for i in range(num_layers))
    lo = LolcatsLayerOptions(
        form=a.form, window=a.window, window_size=a.window_size, feature_map=a.feature_map, fullspace=a.fullspace,
        feature_dim=a.feature_dim, feature_init=a.feature_init, feature_bias=a.feature_bias, eps=a.eps,
        init_window_factor=a.init_window_factor, affine=a.affine, compat=a.compat, backend=a.backend,
        chunk_size=a.chunk_size,
    )
    lora_opts = None
    if lora is not None:
        lora_opts = LoraOptions(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets)
    return ModelOptions(
        param_dtype=cfg.model.param_dtype, compute_dtype=cfg.model.compute_dtype, remat=cfg.model.remat,
        layer_kinds=kinds, lolcats=lo, lora=lora_opts,
    )


def abstract_model(cfg: LlamaConfig, opts: ModelOptions, seed: int = 0) -> Llama:
    return nnx.eval_shape(lambda: Llama(cfg, opts, rngs=nnx.Rngs(seed)))


def init_sharded(cfg: LlamaConfig, opts: ModelOptions, mesh: jax.sharding.Mesh, seed: int = 0) -> Llama:
    """A randomly initialised model whose parameters are created directly in their shards."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg, opts, seed))
    shardings = param_shardings(abstract_state, mesh)

    def init():
        return nnx.split(Llama(cfg, opts, rngs=nnx.Rngs(seed)))[1]

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_model(model: Llama, mesh: jax.sharding.Mesh) -> Llama:
    """The same model with every parameter placed as the logical-axis rules say."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, param_shardings(state, mesh))
    return nnx.merge(graphdef, state)
