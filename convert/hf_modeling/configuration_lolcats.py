"""Configuration of a linearized (LoLCATS) Llama exported by lolcats_jax (`python -m convert.to_hf`).

Self-contained: imports only transformers. The Llama fields are those of `transformers.LlamaConfig`; the
linearization is described by one extra JSON object, `lolcats`:

    form          "hybrid" (sliding-window softmax + linear attention) | "linear"
    window        "tk" (terraced 64-token blocks: own block + previous block) | "sw" (the W most recent keys)
    window_size   W
    feature_map   "softmax_dim" | "exp_dim" | "relu" | "pos_elu";  fullspace: [f(u); f(-u)] (F' = 2F)
    feature_dim   F;  feature_bias: one learned scalar per head added before the activation
    eps           clamp(min=eps) of every feature;  affine: linear factor 1 - gamma instead of 1
    compat        the original LoLCATS end-aligned terraced masks (and sliding-window decoding)
    layer_kinds   per layer "lolcats" | "softmax" (softmax layers are the base family's own attention)
    base_model_type  the family linearized: "llama" | "mistral" | "qwen2" (q/k/v biases) | "qwen3" (q/k RMSNorm) |
                  "mixtral" (MoE MLP; `num_local_experts`, `num_experts_per_tok` are top-level fields as in Mixtral)
    lora          how the LoRA adapters were folded in ({"merged": true, "rank", "alpha", "targets"}) or null
"""

from __future__ import annotations

from transformers import LlamaConfig

LOLCATS_DEFAULTS = {
    "form": "hybrid",
    "window": "tk",
    "window_size": 64,
    "feature_map": "softmax_dim",
    "fullspace": True,
    "feature_dim": 64,
    "feature_bias": False,
    "eps": 1e-12,
    "affine": False,
    "compat": False,
    "layer_kinds": None,  # None: every layer linearized
    "base_model_type": "llama",
    "lora": None,
}


class LolcatsLlamaConfig(LlamaConfig):
    """`LlamaConfig` plus the `lolcats` section (a plain dict, serialised as is into config.json)."""

    model_type = "lolcats_llama"

    def __post_init__(self, **kwargs):
        lolcats = kwargs.pop("lolcats", None)
        if lolcats is None:
            lolcats = getattr(self, "lolcats", None)
        super().__post_init__(**kwargs)
        merged = dict(LOLCATS_DEFAULTS)
        merged.update(lolcats or {})
        self.lolcats = merged

    def layer_kinds(self) -> list[str]:
        """"lolcats" or "softmax" for every decoder layer."""
        kinds = self.lolcats.get("layer_kinds")
        if kinds is None:
            return ["lolcats"] * self.num_hidden_layers
        if len(kinds) != self.num_hidden_layers or any(k not in ("lolcats", "softmax") for k in kinds):
            raise ValueError(f"config.json lolcats.layer_kinds={kinds!r} must list 'lolcats'/'softmax' for each of "
                             f"the {self.num_hidden_layers} layers")
        return list(kinds)


__all__ = ["LolcatsLlamaConfig", "LOLCATS_DEFAULTS"]
