"""The Llama-family model: config, parameters, layers, attention."""

from lolcats_jax.model.llama import FeatureMapParam, Llama, LoraParam, WindowParam
from lolcats_jax.model.llama_config import LlamaConfig, RopeScaling, UnsupportedModelError
from lolcats_jax.model.options import LolcatsLayerOptions, LoraOptions, ModelOptions

__all__ = [
    "Llama",
    "LlamaConfig",
    "RopeScaling",
    "UnsupportedModelError",
    "ModelOptions",
    "LolcatsLayerOptions",
    "LoraOptions",
    "FeatureMapParam",
    "WindowParam",
    "LoraParam",
]
