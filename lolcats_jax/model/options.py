"""Static options of a model instance: dtypes, rematerialisation and which attention each layer uses."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


def to_dtype(name: str | Any):
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
        return DTYPES[name]
    return name


@dataclasses.dataclass(frozen=True)
class LolcatsLayerOptions:
    """How linearized layers are built (mirrors the `attention:` config section)."""

    form: str = "hybrid"  # hybrid | linear
    window: str = "tk"  # tk | sw
    window_size: int = 64
    feature_map: str = "softmax_dim"
    fullspace: bool = True
    feature_dim: int = 64
    feature_init: str = "identity"  # identity (the released runs' zero_init) | kaiming
    feature_bias: bool = False
    eps: float = 1e-12
    init_window_factor: float = -2.1972245773362196
    affine: bool = False
    compat: bool = False
    backend: str = "auto"
    chunk_size: int = 64

    def spec(self):
        from kernels.lolcats import LolcatsSpec

        return LolcatsSpec(
            form=self.form,
            window=self.window,
            window_size=self.window_size,
            feature_map=self.feature_map,
            fullspace=self.fullspace,
            eps=self.eps,
            affine=self.affine,
            compat=self.compat,
            chunk_size=self.chunk_size,
        )


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    param_dtype: str = "bfloat16"
    compute_dtype: str = "float32"
    remat: bool = True
    scan_layers: bool = True
    # per-layer attention kind: "softmax" or "lolcats"; empty = all softmax
    layer_kinds: tuple[str, ...] = ()
    lolcats: LolcatsLayerOptions = LolcatsLayerOptions()
    lora: LoraOptions | None = None

    def kinds(self, num_layers: int) -> tuple[str, ...]:
        if not self.layer_kinds:
            return ("softmax",) * num_layers
        if len(self.layer_kinds) != num_layers:
            raise ValueError(f"layer_kinds has {len(self.layer_kinds)} entries for a model of {num_layers} layers")
        bad = [k for k in self.layer_kinds if k not in ("softmax", "lolcats")]
        if bad:
            raise ValueError(f"unknown layer kinds {bad}; expected 'softmax' or 'lolcats'")
        return self.layer_kinds

    @staticmethod
    def linearized(num_layers: int, softmax_layers=(), **kw) -> "ModelOptions":
        kinds = tuple("softmax" if i in set(softmax_layers) else "lolcats" for i in range(num_layers))
        return ModelOptions(layer_kinds=kinds, **kw)
