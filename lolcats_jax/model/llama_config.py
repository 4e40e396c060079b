"""Architecture of a Llama-family model, read from / written to a Hugging Face `config.json`.

Supported: Llama 3 / 3.1 / 3.2 (incl. `rope_scaling` of type llama3), Mistral (its sliding window is ignored:
every softmax layer attends causally to all keys, as transformers' eager path does for sequences shorter than the
window), Qwen2 / Qwen2.5 (biases on q, k, v), Qwen3 (a per-head RMSNorm on q and k before RoPE) and Mixtral (a
mixture-of-experts MLP: a softmax router picks the top `num_experts_per_tok` of `num_experts` SwiGLU experts per
token, weights renormalised over the chosen ones; its sliding window is ignored as Mistral's). The families differ
only in those options of the one model (`qkv_bias`, `qk_norm`, `num_experts`). Anything else — sliding-window
softmax layers, other rope types, biases elsewhere, router jitter — is refused with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one this project can convert."""


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency-dependent RoPE scaling (transformers' `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"
    qkv_bias: bool = False  # Qwen2: q, k, v projections have biases (o has none)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of q and k (one scale per dim), before RoPE
    num_experts: int = 0  # Mixtral: experts per MoE MLP (0: the dense SwiGLU MLP); intermediate_size is per expert
    num_experts_per_tok: int = 2  # experts each token is routed to (MoE only)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} must be one of {SUPPORTED_MODEL_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be within 1..num_experts="
                             f"{self.num_experts}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        e, h, k, d, m, v = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size, self.vocab_size
        experts = max(self.num_experts, 1)
        per_layer = 2 * e + e * (h + 2 * k) * d + h * d * e + 3 * e * m * experts + e * self.num_experts
        per_layer += (h + 2 * k) * d * self.qkv_bias + 2 * d * self.qk_norm
        return v * e * (1 if self.tie_embeddings else 2) + self.num_layers * per_layer + e

    # ----------------------------------------------------------------------------------------- HF interop

    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "LlamaConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source}: model_type={model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES} "
                "(Llama 3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, Mixtral)"
            )
        archs = cfg.get("architectures") or []
        for arch in archs:
            if arch != ARCHITECTURES[model_type]:
                raise UnsupportedModelError(f"{source}: architecture {arch!r} is not supported for model_type="
                                            f"{model_type!r} (expected {ARCHITECTURES[model_type]})")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise UnsupportedModelError(f"{source}: {flag}=true is not supported ({model_type} checkpoints of the "
                                            f"supported families have no such biases)")
        if model_type in ("qwen2", "qwen3"):
            if cfg.get("use_sliding_window"):
                raise UnsupportedModelError(f"{source}: use_sliding_window=true is not supported (sliding-window "
                                            "softmax layers); only full causal attention layers can be linearized")
            kinds = set(cfg.get("layer_types") or ["full_attention"])
            if kinds != {"full_attention"}:
                raise UnsupportedModelError(f"{source}: layer_types={sorted(kinds)} is not supported (only "
                                            "'full_attention' layers)")
        if model_type == "mixtral":
            if cfg.get("router_jitter_noise"):
                raise UnsupportedModelError(f"{source}: router_jitter_noise={cfg['router_jitter_noise']} is not "
                                            "supported (the router is frozen; expected 0)")
            for key in ("num_local_experts", "num_experts_per_tok"):
                if not isinstance(cfg.get(key, 1), int) or cfg.get(key, 1) < 1:
                    raise UnsupportedModelError(f"{source}: {key}={cfg.get(key)!r} must be a positive integer")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act={act!r} is not supported (expected 'silu')")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise UnsupportedModelError(f"{source}: missing required field(s) {missing}")
        num_heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling_raw = cfg.get("rope_scaling") or (rope_params if rope_params.get("rope_type") not in (None, "default") else None)
        scaling = None
        if scaling_raw:
            rope_type = scaling_raw.get("rope_type", scaling_raw.get("type"))
            if rope_type in (None, "default"):
                scaling = None
            elif rope_type != "llama3":
                raise UnsupportedModelError(f"{source}: rope_scaling type {rope_type!r} is not supported (only 'llama3')")
            else:
                scaling = RopeScaling(
                    factor=float(scaling_raw["factor"]),
                    low_freq_factor=float(scaling_raw["low_freq_factor"]),
                    high_freq_factor=float(scaling_raw["high_freq_factor"]),
                    original_max_position_embeddings=int(scaling_raw["original_max_position_embeddings"]),
                )
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=cfg.get("pad_token_id"),
            model_type=model_type,
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            num_experts=int(cfg.get("num_local_experts", 8)) if model_type == "mixtral" else 0,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)) if model_type == "mixtral" else 2,
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "LlamaConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path}: not found (expected a Hugging Face model directory)")
        with open(cfg_path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise UnsupportedModelError(f"{cfg_path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(raw, source=cfg_path)

    def to_hf_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
        }
        if self.model_type in ("qwen2", "qwen3"):
            out.update(use_sliding_window=False, sliding_window=None)
            del out["mlp_bias"]
            if self.model_type == "qwen2":
                del out["attention_bias"]  # Qwen2 always has q/k/v biases; the field does not exist
        if self.model_type == "mixtral":
            del out["attention_bias"], out["mlp_bias"]
            out.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       sliding_window=None, router_jitter_noise=0.0, output_router_logits=False)
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        for key in ("bos_token_id", "pad_token_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.eos_token_id is not None:
            out["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return out
