"""Llama-family decoder in Flax NNX with stacked (scanned) layers and pluggable attention per layer.

Notation: B batch, T tokens, E hidden size, H query heads, K kv heads, D head dim, M MLP hidden, V vocabulary,
L layers, F feature dim, R LoRA rank, X experts (mixture-of-experts models).

Parameter layout (one layout for the whole project; `convert/` maps HF tensors onto it):

    embed               (V, E)        ("vocab", "embed")
    layers.attn_norm    (L, E)        ("layers", "norm")
    layers.wq           (L, E, H, D)  ("layers", "embed", "q_heads", "head_dim")
    layers.wk / wv      (L, E, K, D)  ("layers", "embed", "kv_heads", "head_dim")
    layers.wo           (L, H, D, E)  ("layers", "q_heads", "head_dim", "embed")
    layers.bq / bk / bv (L, H|K, D)   ("layers", "q_heads"|"kv_heads", "head_dim")   cfg.qkv_bias only (Qwen2)
    layers.q_norm/k_norm (L, D)       ("layers", "head_dim")                          cfg.qk_norm only (Qwen3)
    layers.mlp_norm     (L, E)
    layers.w_gate/w_up  (L, E, M)     ("layers", "embed", "mlp")
    layers.w_down       (L, M, E)     ("layers", "mlp", "embed")
    layers.router       (L, E, X)     ("layers", "embed", None)                       cfg.num_experts only (Mixtral)
    layers.w_gate/w_up  (L, X, E, M)  ("layers", "expert", "embed", "mlp")            with experts, instead of the above
    layers.w_down       (L, X, M, E)  ("layers", "expert", "mlp", "embed")
    final_norm          (E,)          ("norm",)
    lm_head             (E, V)        ("embed", "vocab")      absent when embeddings are tied
    lolcats.fmap_q/k    (N, H, D, F)  FeatureMapParam, N = number of linearized layers
    lolcats.window_logit (N, H)       WindowParam (γ = sigmoid)
    lora.<t>_a / <t>_b                LoraParam, stacked over all L layers

Layers of the same attention kind that follow each other form a *segment*, run with one `lax.scan` (compile time
does not grow with depth); a model with some layers kept softmax simply has several segments.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lolcats_jax.model.llama_config import LlamaConfig
from lolcats_jax.model.options import LORA_TARGETS, ModelOptions, to_dtype
from lolcats_jax.model.rope import apply_rope, inverse_frequencies, rope_tables
from lolcats_jax.model.softmax_attention import cached_softmax_attention, causal_softmax_attention
from lolcats_jax.sharding import constrain


class FeatureMapParam(nnx.Param):
    """Learned Hedgehog feature-map weights (trained in attention transfer)."""


class WindowParam(nnx.Param):
    """Per-head window-factor logits θ, γ = sigmoid(θ) (trained in attention transfer)."""


class LoraParam(nnx.Param):
    """Low-rank adapter weights (trained in LoRA finetuning)."""


# logical axes of the per-layer base weights (without the leading "layers")
BASE_AXES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("norm",),
    "wq": ("embed", "q_heads", "head_dim"),
    "wk": ("embed", "kv_heads", "head_dim"),
    "wv": ("embed", "kv_heads", "head_dim"),
    "wo": ("q_heads", "head_dim", "embed"),
    "bq": ("q_heads", "head_dim"),
    "bk": ("kv_heads", "head_dim"),
    "bv": ("kv_heads", "head_dim"),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "mlp_norm": ("norm",),
    "w_gate": ("embed", "mlp"),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
    "router": ("embed", None),
}


def base_axes(cfg: LlamaConfig, name: str) -> tuple[str | None, ...]:
    """Logical axes of per-layer base parameter `name` (without "layers"): the MLP weights of a mixture-of-experts
    model have a leading "expert" axis."""
    axes = BASE_AXES[name]
    return ("expert", *axes) if cfg.is_moe and name in EXPERT_PARAMS else axes


EXPERT_PARAMS = ("w_gate", "w_up", "w_down")


def base_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer base parameters of `cfg` (HF order), without the leading layers axis."""
    E, H, K, D, M = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    out = {"attn_norm": (E,), "wq": (E, H, D), "wk": (E, K, D), "wv": (E, K, D), "wo": (H, D, E)}
    if cfg.qkv_bias:
        out.update(bq=(H, D), bk=(K, D), bv=(K, D))
    if cfg.qk_norm:
        out.update(q_norm=(D,), k_norm=(D,))
    out["mlp_norm"] = (E,)
    if cfg.is_moe:
        X = cfg.num_experts
        out.update(router=(E, X), w_gate=(X, E, M), w_up=(X, E, M), w_down=(X, M, E))
    else:
        out.update(w_gate=(E, M), w_up=(E, M), w_down=(M, E))
    return out


def lora_shapes(cfg: LlamaConfig, rank: int) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], tuple[int, ...], tuple[str, ...]]]:
    """target → (A shape, A axes, B shape, B axes), per layer. A is (in, R), B is (R, out...); the MLP targets of a
    mixture-of-experts model have one adapter per expert, (X, in, R) and (X, R, out)."""
    E, H, K, D, M = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    out = {
        "q": ((E, rank), ("embed", "lora_rank"), (rank, H, D), ("lora_rank", "q_heads", "head_dim")),
        "k": ((E, rank), ("embed", "lora_rank"), (rank, K, D), ("lora_rank", "kv_heads", "head_dim")),
        "v": ((E, rank), ("embed", "lora_rank"), (rank, K, D), ("lora_rank", "kv_heads", "head_dim")),
        "o": ((H, D, rank), ("q_heads", "head_dim", "lora_rank"), (rank, E), ("lora_rank", "embed")),
        "gate": ((E, rank), ("embed", "lora_rank"), (rank, M), ("lora_rank", "mlp")),
        "up": ((E, rank), ("embed", "lora_rank"), (rank, M), ("lora_rank", "mlp")),
        "down": ((M, rank), ("mlp", "lora_rank"), (rank, E), ("lora_rank", "embed")),
    }
    if cfg.is_moe:
        X = cfg.num_experts
        for t in ("gate", "up", "down"):
            a_shape, a_axes, b_shape, b_axes = out[t]
            out[t] = ((X, *a_shape), ("expert", *a_axes), (X, *b_shape), ("expert", *b_axes))
    return out


def lora_fan_in(cfg: LlamaConfig, target: str, a_shape: tuple[int, ...]) -> int:
    """Input features of one adapted matrix (PEFT's fan-in: per expert for expert MLPs)."""
    dims = a_shape[1:-1] if cfg.is_moe and target in ("gate", "up", "down") else a_shape[:-1]
    fan_in = 1
    for s in dims:
        fan_in *= s
    return fan_in


class Segment(NamedTuple):
    kind: str  # "softmax" | "lolcats"
    start: int  # first layer (global index)
    stop: int  # one past the last layer
    lin_start: int  # index into the stacked lolcats parameters (lolcats segments only)


def segments_of(kinds: tuple[str, ...]) -> list[Segment]:
    out: list[Segment] = []
    lin = 0
    start = 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            out.append(Segment(kinds[start], start, i, lin))
            if kinds[start] == "lolcats":
                lin += i - start
            start = i
    return out


def rms_norm(x_BTE: jax.Array, scale_E: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with float32 statistics, output in the input dtype (transformers' LlamaRMSNorm)."""
    x = x_BTE.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return scale_E.astype(x_BTE.dtype) * x.astype(x_BTE.dtype)


class _Container(nnx.Module):
    """Holds a group of parameters as attributes."""


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, opts: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.opts = opts
        pdt = to_dtype(opts.param_dtype)
        E, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
        normal = nnx.initializers.normal(0.02)
        self.embed = nnx.Param(normal(rngs.params(), (V, E), pdt), axes=("vocab", "embed"))
        self.layers = _Container()
        for name, shape in base_shapes(cfg).items():
            if name.endswith("norm"):
                value = jnp.ones((L, *shape), pdt)
            elif name in ("bq", "bk", "bv"):
                value = jnp.zeros((L, *shape), pdt)
            else:
                value = normal(rngs.params(), (L, *shape), pdt)
            setattr(self.layers, name, nnx.Param(value, axes=("layers", *base_axes(cfg, name))))
        self.final_norm = nnx.Param(jnp.ones((E,), pdt), axes=("norm",))
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(normal(rngs.params(), (E, V), pdt), axes=("embed", "vocab"))
        self.kinds = opts.kinds(L)
        self.lin_layers = tuple(i for i, k in enumerate(self.kinds) if k == "lolcats")
        if self.lin_layers:
            self.lolcats = _Container()
            self._init_lolcats(rngs)
        if opts.lora is not None:
            self.lora = _Container()
            self._init_lora(rngs)

    # ------------------------------------------------------------------------------------------- init

    def _init_lolcats(self, rngs: nnx.Rngs) -> None:
        """Feature maps and window factors are trainable fp32 master weights, whatever the base dtype."""
        from kernels.lolcats import init_feature_maps, init_window_logit

        lo, cfg = self.opts.lolcats, self.cfg
        N, H, D = len(self.lin_layers), cfg.num_heads, cfg.head_dim
        keys = jax.random.split(rngs.params(), N)
        maps = [init_feature_maps(k, H, D, lo.feature_dim, init=lo.feature_init, bias=lo.feature_bias, dtype=jnp.float32) for k in keys]
        stack = lambda field: jnp.stack([getattr(m, field) for m in maps])
        fm_axes = ("layers", "q_heads", "head_dim", "feature")
        self.lolcats.fmap_q = FeatureMapParam(stack("wq"), axes=fm_axes)
        self.lolcats.fmap_k = FeatureMapParam(stack("wk"), axes=fm_axes)
        if lo.feature_bias:
            self.lolcats.fbias_q = FeatureMapParam(stack("bq"), axes=("layers", "q_heads"))
            self.lolcats.fbias_k = FeatureMapParam(stack("bk"), axes=("layers", "q_heads"))
        theta = jnp.stack([init_window_logit(H, lo.init_window_factor, dtype=jnp.float32)] * N)
        self.lolcats.window_logit = WindowParam(theta, axes=("layers", "q_heads"))

    def _init_lora(self, rngs: nnx.Rngs) -> None:
        lo, cfg = self.opts.lora, self.cfg
        for t in lo.targets:
            if t not in LORA_TARGETS:
                raise ValueError(f"unknown LoRA target {t!r}; expected some of {LORA_TARGETS}")
        if cfg.is_moe and lo.dropout > 0 and set(lo.targets) & {"gate", "up", "down"}:
            raise ValueError(f"lora.dropout={lo.dropout} with expert MLP targets {sorted(set(lo.targets) & {'gate', 'up', 'down'})} "
                             "of a mixture-of-experts model is not supported (use dropout 0 or attention targets)")
        pdt = jnp.float32
        for t in lo.targets:
            a_shape, a_axes, b_shape, b_axes = lora_shapes(cfg, lo.rank)[t]
            fan_in = lora_fan_in(cfg, t, a_shape)
            bound = 1.0 / jnp.sqrt(fan_in)  # PEFT: kaiming_uniform(a=√5) = U(±1/√fan_in); B = 0
            a = jax.random.uniform(rngs.params(), (cfg.num_layers, *a_shape), pdt, -bound, bound)
            setattr(self.lora, f"{t}_a", LoraParam(a, axes=("layers", *a_axes)))
            setattr(self.lora, f"{t}_b", LoraParam(jnp.zeros((cfg.num_layers, *b_shape), pdt), axes=("layers", *b_axes)))

    # ------------------------------------------------------------------------------------------ pieces

    @property
    def compute_dtype(self):
        return to_dtype(self.opts.compute_dtype)

    def embed_tokens(self, tokens_BT: jax.Array) -> jax.Array:
        x = jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.compute_dtype)
        return constrain(x, ("batch", "seq", "act_embed"))

    def logits(self, x_BTE: jax.Array) -> jax.Array:
        x = rms_norm(x_BTE, self.final_norm[...], self.cfg.rms_norm_eps)
        if self.cfg.tie_embeddings:
            head = self.embed[...].astype(self.compute_dtype).T
        else:
            head = self.lm_head[...].astype(self.compute_dtype)
        logits = jnp.einsum("bte,ev->btv", x, head, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "act_vocab"))

    def _segment_params(self, seg: Segment) -> dict[str, Any]:
        p: dict[str, Any] = {name: getattr(self.layers, name)[...][seg.start : seg.stop] for name in base_shapes(self.cfg)}
        if seg.kind == "lolcats":
            n = seg.stop - seg.start
            sl = slice(seg.lin_start, seg.lin_start + n)
            for name in LOLCATS_PARAMS:
                if hasattr(self.lolcats, name):
                    p[name] = getattr(self.lolcats, name)[...][sl]
        if self.opts.lora is not None:
            for t in self.opts.lora.targets:
                p[f"lora_{t}_a"] = getattr(self.lora, f"{t}_a")[...][seg.start : seg.stop]
                p[f"lora_{t}_b"] = getattr(self.lora, f"{t}_b")[...][seg.start : seg.stop]
        return p

    def _ctx(self, positions_BT: jax.Array) -> "LayerContext":
        inv = inverse_frequencies(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        cos, sin = rope_tables(positions_BT, inv)
        lora = self.opts.lora
        return LayerContext(
            cfg=self.cfg,
            opts=self.opts,
            cos=cos,
            sin=sin,
            lora_scale=0.0 if lora is None else lora.scale,
            lora_targets=() if lora is None else lora.targets,
            lora_dropout=0.0 if lora is None else lora.dropout,
        )

    # ------------------------------------------------------------------------------------------ forward

    def run_layers(
        self, x_BTE: jax.Array, positions_BT: jax.Array, mode: str = "forward", *, layers: tuple[int, int] | None = None,
        lora_dropout_key: jax.Array | None = None, **mode_kw
    ) -> tuple[jax.Array, list]:
        """Runs every layer (or only layers [start, stop) when `layers` is given, `x_BTE` then being the hidden
        states entering layer `start`); returns the last hidden states and, per layer run, the mode's `aux`.
        `lora_dropout_key` (training only) applies LoRA dropout: layer ℓ draws its masks from fold_in(key, ℓ)."""
        from lolcats_jax.model import layer  # local import: layer imports this module's helpers

        lo, hi = (0, self.cfg.num_layers) if layers is None else layers
        if not 0 <= lo < hi <= self.cfg.num_layers:
            raise ValueError(f"layers={layers} is not a non-empty range within 0..{self.cfg.num_layers}")
        ctx = self._ctx(positions_BT)
        per_layer: list = [None] * self.cfg.num_layers
        for seg in segments_of(self.kinds):
            start, stop = max(seg.start, lo), min(seg.stop, hi)
            if start >= stop:
                continue
            seg = Segment(seg.kind, start, stop, seg.lin_start + start - seg.start)
            params = self._segment_params(seg)
            if lora_dropout_key is not None and ctx.lora_dropout > 0 and ctx.lora_targets:
                keys = jax.vmap(lambda i: jax.random.fold_in(lora_dropout_key, i))(jnp.arange(seg.start, seg.stop))
                params = dict(params, lora_dropout_key=keys)
            body = layer.make_body(ctx, seg.kind, mode, **mode_kw)
            if self.opts.remat and mode != "distill":
                # (attention transfer takes each layer's gradient inside the layer: no activations wait for a backward pass)
                body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
            x_BTE, aux = jax.lax.scan(body, x_BTE, params)
            for j in range(seg.stop - seg.start):
                per_layer[seg.start + j] = jax.tree.map(lambda a: a[j], aux)
        return x_BTE, per_layer[lo:hi]

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None, *,
                 lora_dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits (B, T, V) in float32."""
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
        x, _ = self.run_layers(self.embed_tokens(tokens_BT), positions_BT, lora_dropout_key=lora_dropout_key)
        return self.logits(x)

    def teacher_logits(self, tokens_BT: jax.Array) -> jax.Array:
        """Logits (B, T, V) in float32 of the softmax teacher held in this model's base weights: softmax attention in
        every layer, LoRA off (layer mode "teacher"). No gradient flows through them."""
        positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
        x, _ = self.run_layers(self.embed_tokens(tokens_BT), positions_BT, mode="teacher")
        return jax.lax.stop_gradient(self.logits(x))


# a linearized layer's own parameters (feature maps, their optional biases, window factors), as a layer body sees them
LOLCATS_PARAMS = ("fmap_q", "fmap_k", "fbias_q", "fbias_k", "window_logit")


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """Everything a layer body needs besides its own parameters (static config + RoPE tables)."""

    cfg: LlamaConfig
    opts: ModelOptions
    cos: jax.Array
    sin: jax.Array
    lora_scale: float
    lora_targets: tuple[str, ...]
    lora_dropout: float = 0.0


def apply_rope_ctx(ctx: LayerContext, x_BTHD: jax.Array) -> jax.Array:
    return apply_rope(x_BTHD, ctx.cos, ctx.sin)


__all__ = [
    "Llama",
    "LayerContext",
    "FeatureMapParam",
    "WindowParam",
    "LoraParam",
    "rms_norm",
    "segments_of",
    "Segment",
    "BASE_AXES",
    "EXPERT_PARAMS",
    "base_axes",
    "base_shapes",
    "lora_shapes",
    "causal_softmax_attention",
    "cached_softmax_attention",
]
