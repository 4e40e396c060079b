"""PyTorch model of a linearized (LoLCATS) Llama exported by lolcats_jax; loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Self-contained (torch + transformers).

Notation: B batch, T new tokens, N keys held explicitly, H query heads, K kv heads, D head dim, F learned feature
dim, F' feature dim after the activation (2F for fullspace softmax_dim / exp_dim), W window size.

Attention of a linearized layer (keys/values repeated to the H query heads, post-RoPE, absolute positions i, j):
s_ij = q_i·k_j/√D, γ = sigmoid(θ_h) (θ = `window_factors`), λ = 1 (or 1 − γ when `affine`), φ = learned feature map,
window set 𝒲_i and linear set 𝓛_i:

    hybrid  y_i = Σ_j (γ e^{s_ij − c_i}[j∈𝒲_i] + λ φ_q(q_i)·φ_k(k_j)[j∈𝓛_i]) v_j / Σ_j (same),  c_i = max_{j∈𝒲_i} s_ij
    linear  y_i = Σ_{j≤i} (φ_q(q_i)·φ_k(k_j)) v_j / (Σ_{j≤i} φ_q(q_i)·φ_k(k_j) + 1e-12)

    sw        𝒲_i = {i−W < j ≤ i},                        𝓛_i = {j ≤ i−W}
    tk        blk(t) = t // W: 𝒲_i = {j ≤ i: blk(j) ≥ blk(i)−1},  𝓛_i = {j ≤ i: blk(j) ≤ blk(i)−2}
    compat tk blocks aligned to the END of a call of length T: blk(t) = (t + ⌈T/W⌉W − T) // W, and for T ≤ W every
              causal key is in both sets (the original implementation's masks).

Recurrent form (`use_cache=True`): every linearized layer keeps the keys/values it still needs explicitly plus the
state S = Σ φ_k(k_j) v_jᵀ (H, F', D) and z = Σ φ_k(k_j) (H, F') in float32 over all older keys. After each call, keys
older than the boundary of the last position t are folded into the state: t − W + 1 for sw (a ring of W keys),
(t // W − 1)·W for tk (up to 2W keys; a whole block enters the state when a new block begins), t + 1 for the linear
form. Keys below that boundary are linear for every later query, so decoding reproduces the parallel form exactly.
All attention math is float32; the output is cast to the hidden-state dtype.

With `compat` (hybrid form) the cache follows the original implementation instead (its LinearAttentionTKWindowCache):
one-token calls decode with a sliding window of W keys; a call of several tokens on a cache is its "stateful" branch:
the new tokens attend to each other with the masks of a call of their own length, and to everything before only
through the call state (Σ φ_k v over the tokens of earlier multi-token calls — decoded tokens never enter it); then
the decode state gains the new tokens but their last W, which replace the held keys (older held keys are dropped).

Padding is not supported in linearized layers (as in the original): a 2-D attention mask with zeros only affects
the softmax layers, and a warning is printed.

Base families (`lolcats.base_model_type`): llama and mistral (plain projections), qwen2 (biases on q, k, v), qwen3
(RMSNorm of q and k over the head dim, before RoPE), mixtral (plain projections; the MLP is a mixture of experts:
a router softmax in float32, the top `num_experts_per_tok` of `num_local_experts` SwiGLU experts per token, their
weights renormalised, stored as Mixtral's `block_sparse_moe.gate` / `experts.{j}.w1,w2,w3`). Layers kept softmax
use transformers' own attention class of the family; the rest of the decoder (norms, RoPE, the dense SwiGLU MLP of
the dense families) is the same in all of them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch import nn
from transformers import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers.cache_utils import CacheLayerMixin, DynamicLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, apply_rotary_pos_emb, repeat_kv

try:  # transformers >= 5: initialisers that skip weights loaded from the checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover
    _init = nn.init

from .configuration_lolcats import LolcatsLlamaConfig

LINEAR_DENOM_EPS = 1e-12
FORMS, WINDOWS = ("hybrid", "linear"), ("tk", "sw")
FEATURE_MAPS = ("softmax_dim", "exp_dim", "relu", "pos_elu")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral")


def base_family(config: LolcatsLlamaConfig) -> str:
    """The architecture family the model was linearized from (exports before this field: llama)."""
    family = config.lolcats.get("base_model_type") or "llama"
    if family not in FAMILIES:
        raise ValueError(f"config.json lolcats.base_model_type={family!r} must be one of {FAMILIES}")
    return family


def softmax_attention(config: LolcatsLlamaConfig, layer_idx: int) -> nn.Module:
    """transformers' own attention of the base family, for a layer kept softmax."""
    family = base_family(config)
    if family == "qwen2":
        from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

        return Qwen2Attention(config, layer_idx)
    if family == "qwen3":
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

        return Qwen3Attention(config, layer_idx)
    from transformers.models.llama.modeling_llama import LlamaAttention

    return LlamaAttention(config, layer_idx)


@dataclasses.dataclass(frozen=True)
class LolcatsSettings:
    """The `lolcats` section of config.json, checked."""

    form: str
    window: str
    window_size: int
    feature_map: str
    fullspace: bool
    feature_dim: int
    feature_bias: bool
    eps: float
    affine: bool
    compat: bool

    @classmethod
    def from_config(cls, config: LolcatsLlamaConfig) -> "LolcatsSettings":
        raw = config.lolcats
        s = cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})
        for name, allowed in (("form", FORMS), ("window", WINDOWS), ("feature_map", FEATURE_MAPS)):
            if getattr(s, name) not in allowed:
                raise ValueError(f"config.json lolcats.{name}={getattr(s, name)!r} must be one of {allowed}")
        if int(s.window_size) < 1 or int(s.feature_dim) < 1:
            raise ValueError(f"config.json lolcats.window_size={s.window_size} and feature_dim={s.feature_dim} must be >= 1")
        return s

    def doubled(self) -> bool:
        return self.fullspace and self.feature_map in ("softmax_dim", "exp_dim")

    def uses_compat_masks(self) -> bool:
        return self.compat and self.form == "hybrid" and self.window == "tk"

    def state_boundary(self, last_pos: int) -> int:
        """Keys at positions below this are linear for every query at position > last_pos (they go to the state)."""
        if self.form == "linear":
            return last_pos + 1
        w = int(self.window_size)
        if self.window == "sw" or self.compat:  # compat decodes with sliding windows, as the original does
            return max(0, last_pos - w + 1)
        return max(0, (last_pos // w - 1) * w)


def key_sets(pos_q: torch.Tensor, pos_k: torch.Tensor, s: LolcatsSettings, compat_len: int | None):
    """Boolean (window, linear) masks (T, N) for absolute query/key positions. `compat_len`: length T of a first,
    cache-less call (compat tk masks are aligned to its end); None for calls continuing a cache."""
    i, j = pos_q[:, None], pos_k[None, :]
    causal = j <= i
    if s.form == "linear":
        return torch.zeros_like(causal), causal
    w = int(s.window_size)
    if s.window == "sw" or (s.compat and compat_len is None):
        return causal & (j > i - w), causal & (j <= i - w)
    offset = 0
    if s.uses_compat_masks():
        num_blocks = -(-int(compat_len) // w)
        if num_blocks <= 1:  # the original's roll(blockdiag, -W) is the identity: both sets on every causal key
            return causal, causal
        offset = num_blocks * w - int(compat_len)
    blk_i, blk_j = torch.div(i + offset, w, rounding_mode="floor"), torch.div(j + offset, w, rounding_mode="floor")
    return causal & (blk_j >= blk_i - 1), causal & (blk_j <= blk_i - 2)


class LolcatsFeatureMap(nn.Module):
    """φ(x) = act(x·weight[h] + bias[h]), weight (H, D, F), optional bias (H,) (one scalar per head)."""

    def __init__(self, num_heads: int, head_dim: int, s: LolcatsSettings):
        super().__init__()
        self.settings = s
        self.weight = nn.Parameter(torch.zeros(num_heads, head_dim, int(s.feature_dim)))
        self.bias = nn.Parameter(torch.zeros(num_heads)) if s.feature_bias else None

    def forward(self, x_BHTD: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) → (B, H, T, F') in float32."""
        s = self.settings
        u = torch.einsum("bhtd,hdf->bhtf", x_BHTD.float(), self.weight.float())
        if self.bias is not None:
            u = u + self.bias.float()[None, :, None, None]
        if s.feature_map == "softmax_dim":
            parts = [torch.softmax(u, dim=-1)] + ([torch.softmax(-u, dim=-1)] if s.fullspace else [])
        elif s.feature_map == "exp_dim":
            parts = [torch.exp(u - u.amax(dim=-1, keepdim=True))]
            if s.fullspace:
                parts.append(torch.exp(u.amin(dim=-1, keepdim=True) - u))
        elif s.feature_map == "relu":
            parts = [torch.relu(u)]
        else:
            parts = [1.0 + nn.functional.elu(u)]
        phi = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return phi.clamp(min=float(s.eps))


class LolcatsCacheLayer(CacheLayerMixin):
    """Recurrent cache of one linearized layer: explicit keys/values (B, K, N, D) from position `key_start`, and the
    float32 state S (B, H, F', D), z (B, H, F') of every older key. `seen` counts the tokens consumed."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.key_start = 0
        self.seen = 0
        self.kv_state: torch.Tensor | None = None  # S
        self.k_state: torch.Tensor | None = None  # z
        self.call_kv_state: torch.Tensor | None = None  # compat: S over the tokens of multi-token calls
        self.call_k_state: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Appends keys/values (what `LolcatsAttention` calls before attending); returns all explicit ones."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def fold(self, boundary: int, feature_map_k: LolcatsFeatureMap, groups: int) -> None:
        """Moves the keys at positions < boundary into the linear state."""
        m = boundary - self.key_start
        if m <= 0:
            return
        k_old = repeat_kv(self.keys[..., :m, :], groups)
        v_old = repeat_kv(self.values[..., :m, :], groups).float()
        f_k = feature_map_k(k_old)  # (B, H, m, F')
        kv = torch.einsum("bhmf,bhmd->bhfd", f_k, v_old)
        z = f_k.sum(dim=2)
        self.kv_state = kv if self.kv_state is None else self.kv_state + kv
        self.k_state = z if self.k_state is None else self.k_state + z
        self.keys, self.values = self.keys[..., m:, :], self.values[..., m:, :]
        self.key_start = boundary

    def add_call(self, f_k: torch.Tensor, v_rep: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 window: int, first: bool) -> None:
        """compat: the original's update after a multi-token call of T tokens (features f_k (B,H,T,F'), float32
        values (B,H,T,D), raw keys/values (B,K,T,D)): the call state gains all T, the decode state all but the last
        W, and the held keys become the last W (a first call holds them already)."""
        T = f_k.shape[2]
        kv, z = torch.einsum("bhtf,bhtd->bhfd", f_k, v_rep), f_k.sum(dim=2)
        self.call_kv_state = kv if self.call_kv_state is None else self.call_kv_state + kv
        self.call_k_state = z if self.call_k_state is None else self.call_k_state + z
        if first:
            return
        m = max(T - window, 0)
        kv, z = torch.einsum("bhtf,bhtd->bhfd", f_k[:, :, :m], v_rep[:, :, :m]), f_k[:, :, :m].sum(dim=2)
        self.kv_state = kv if self.kv_state is None else self.kv_state + kv
        self.k_state = z if self.k_state is None else self.k_state + z
        self.keys, self.values = keys[..., m:, :], values[..., m:, :]
        self.key_start = self.seen + m
        self.seen += T

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.kv_state = self.k_state = self.call_kv_state = self.call_k_state = None
        self.is_initialized = False
        self.key_start = self.seen = 0

    def _map_batch(self, fn) -> None:
        for name in ("keys", "values", "kv_state", "k_state", "call_kv_state", "call_k_state"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a LoLCATS recurrent state cannot be cropped (no assisted/speculative decoding)")


def _cache_layer(cache, layer_idx: int) -> LolcatsCacheLayer:
    """This layer's slot of a transformers `Cache`, turned into a `LolcatsCacheLayer` on first use."""
    layers = cache.layers
    while len(layers) <= layer_idx:
        layers.append((getattr(cache, "layer_class_to_replicate", None) or DynamicLayer)())
    layer = layers[layer_idx]
    if not isinstance(layer, LolcatsCacheLayer):
        if getattr(layer, "is_initialized", False) and layer.get_seq_length() > 0:
            raise ValueError(f"cache layer {layer_idx} already holds a softmax KV cache; pass a fresh cache")
        layer = LolcatsCacheLayer()
        layers[layer_idx] = layer
    return layer


def lolcats_attend(q, k, v, f_q, f_k, gamma_H, lam_H, window, linear, kv_state, k_state, form: str):
    """y (B, H, T, D) float32 from float32 q (B,H,T,D), keys/values (B,H,N,D), features (B,H,T|N,F'), masks (T, N)
    and the optional state of older keys (S (B,H,F',D), z (B,H,F'))."""
    lin_w = torch.einsum("bhtf,bhnf->bhtn", f_q, f_k).masked_fill(~linear, 0.0)
    if form == "linear":
        num, den, extra = lin_w @ v, lin_w.sum(-1), LINEAR_DENOM_EPS
        lam = torch.ones_like(gamma_H)[None, :, None]
    else:
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~window, float("-inf"))
        c = s.amax(dim=-1, keepdim=True)  # every query's own key is in its window
        p = gamma_H[None, :, None, None] * torch.exp(s - c) + lam_H[None, :, None, None] * lin_w
        num, den, extra = p @ v, p.sum(-1), 0.0
        lam = lam_H[None, :, None]
    if kv_state is not None:
        num = num + lam[..., None] * torch.einsum("bhtf,bhfd->bhtd", f_q, kv_state)
        den = den + lam * torch.einsum("bhtf,bhf->bht", f_q, k_state)
    return num / (den + extra)[..., None]


class LolcatsAttention(nn.Module):
    """Drop-in replacement for `LlamaAttention` in a linearized layer (same q/k/v/o projections and RoPE)."""

    def __init__(self, config: LolcatsLlamaConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.settings = LolcatsSettings.from_config(config)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        H, K, E = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
        self.num_key_value_groups = H // K
        family = base_family(config)
        qkv_bias = family == "qwen2"
        self.q_proj = nn.Linear(E, H * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(E, K * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(E, K * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(H * self.head_dim, E, bias=False)
        if family == "qwen3":
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.feature_map_q = LolcatsFeatureMap(H, self.head_dim, self.settings)
        self.feature_map_k = LolcatsFeatureMap(H, self.head_dim, self.settings)
        self.window_factors = nn.Parameter(torch.zeros(H))  # logits θ: γ = sigmoid(θ)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if cache is None:
            cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
        s, G = self.settings, self.num_key_value_groups
        B, T, _ = hidden_states.shape
        shape = (B, T, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        if hasattr(self, "q_norm"):  # qwen3: per-head RMSNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        _warn_if_padded(attention_mask)

        layer = None if cache is None else _cache_layer(cache, self.layer_idx)
        start = 0 if layer is None else layer.seen
        gamma = torch.sigmoid(self.window_factors.float())
        lam = 1.0 - gamma if s.affine else torch.ones_like(gamma)
        original_cache = layer is not None and s.compat and s.form == "hybrid"
        if original_cache and start > 0 and T > 1:  # the original's stateful branch (see the module docstring)
            pos = torch.arange(T, device=q.device)
            window, linear = key_sets(pos, pos, s, compat_len=T)
            k_rep, v_rep = repeat_kv(k, G).float(), repeat_kv(v, G).float()
            f_q, f_k = self.feature_map_q(q), self.feature_map_k(k_rep)
            y = lolcats_attend(q.float(), k_rep, v_rep, f_q, f_k, gamma, lam, window, linear, layer.call_kv_state,
                               layer.call_k_state, s.form)
            layer.add_call(f_k, v_rep, k, v, int(s.window_size), first=False)
        else:
            key_start = 0 if layer is None else layer.key_start
            if layer is not None:
                k, v = layer.update(k, v)
            device = q.device
            pos_q = torch.arange(start, start + T, device=device)
            pos_k = torch.arange(key_start, start + T, device=device)
            # compat: a first call has the original's masks for its length, one-token calls on a cache its decoder
            window, linear = key_sets(pos_q, pos_k, s, compat_len=T if start == 0 else None)
            k_rep, v_rep = repeat_kv(k, G).float(), repeat_kv(v, G).float()
            f_q, f_k = self.feature_map_q(q), self.feature_map_k(k_rep)
            kv_state = None if layer is None else layer.kv_state
            k_state = None if layer is None else layer.k_state
            y = lolcats_attend(q.float(), k_rep, v_rep, f_q, f_k, gamma, lam, window, linear, kv_state, k_state, s.form)
            if layer is not None:
                if original_cache and start == 0:
                    layer.add_call(f_k, v_rep, k, v, int(s.window_size), first=True)
                layer.seen = start + T
                layer.fold(s.state_boundary(start + T - 1), self.feature_map_k, G)
        y = y.to(hidden_states.dtype).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y), None


_warned_padding = False


def _warn_if_padded(attention_mask) -> None:
    """Warns once if the mask hides a causal key (padding): linearized layers attend to it anyway."""
    global _warned_padding
    if _warned_padding or not isinstance(attention_mask, torch.Tensor):
        return
    if attention_mask.dim() == 2:
        padded = bool((attention_mask == 0).any())
    elif attention_mask.dim() == 4:  # (B, 1, T, N) boolean (True = attend) or additive float mask
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        T, N = allowed.shape[-2:]
        i = torch.arange(T, device=allowed.device)[:, None] + (N - T)
        causal = torch.arange(N, device=allowed.device)[None, :] <= i
        padded = bool((causal & ~allowed).any())
    else:
        return
    if padded:
        _warned_padding = True
        warnings.warn("LoLCATS layers ignore the attention mask: padded batches attend to padding tokens")


class LolcatsLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = LolcatsLlamaConfig
    _no_split_modules = ["LlamaDecoderLayer", "LolcatsMoeDecoderLayer"]  # device_map="auto" keeps a layer whole
    _keep_in_fp32_modules_strict = ["feature_map_q", "feature_map_k", "window_factors"]
    _supports_flex_attn = False
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        if isinstance(module, LolcatsFeatureMap):
            _init.copy_(module.weight, torch.eye(*module.weight.shape[1:]).expand_as(module.weight))
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, LolcatsAttention):
            _init.constant_(module.window_factors, -2.1972245773362196)  # γ = 0.1
        else:
            super()._init_weights(module)


class LolcatsExpert(nn.Module):
    """One SwiGLU expert in Mixtral's layout: w2(silu(w1 x) ⊙ w3 x)."""

    def __init__(self, config: LolcatsLlamaConfig):
        super().__init__()
        E, M = config.hidden_size, config.intermediate_size
        self.w1 = nn.Linear(E, M, bias=False)
        self.w2 = nn.Linear(M, E, bias=False)
        self.w3 = nn.Linear(E, M, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class LolcatsSparseMoe(nn.Module):
    """Mixtral's mixture-of-experts MLP: p = softmax(gate(h)) in float32, the top k experts per token, weights
    renormalised over them, y = Σ_k w_k · expert_k(h) accumulated in float32."""

    def __init__(self, config: LolcatsLlamaConfig):
        super().__init__()
        self.top_k = int(config.num_experts_per_tok)
        self.gate = nn.Linear(config.hidden_size, int(config.num_local_experts), bias=False)
        self.experts = nn.ModuleList(LolcatsExpert(config) for _ in range(int(config.num_local_experts)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(h).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        for x, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == x)
            if token.numel():
                out.index_add_(0, token, expert(h[token]).float() * weights[token, slot, None])
        return out.to(hidden_states.dtype).reshape(shape)


class LolcatsMoeDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose MLP is `LolcatsSparseMoe`, registered as `block_sparse_moe` (Mixtral's names)."""

    def __init__(self, config: LolcatsLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        del self._modules["mlp"]  # the dense MLP the base class builds
        self.block_sparse_moe = LolcatsSparseMoe(config)

    @property
    def mlp(self) -> LolcatsSparseMoe:  # what the base class's forward calls
        return self.block_sparse_moe


def _linearize_layers(model: LlamaModel, config: LolcatsLlamaConfig) -> None:
    family = base_family(config)
    if family == "mixtral":
        for i in range(config.num_hidden_layers):
            model.layers[i] = LolcatsMoeDecoderLayer(config, i)
    for i, kind in enumerate(config.layer_kinds()):
        if kind == "lolcats":
            model.layers[i].self_attn = LolcatsAttention(config, i)
        elif family in ("qwen2", "qwen3"):
            model.layers[i].self_attn = softmax_attention(config, i)


class LolcatsLlamaModel(LolcatsLlamaPreTrainedModel, LlamaModel):
    def __init__(self, config: LolcatsLlamaConfig):
        LlamaModel.__init__(self, config)
        _linearize_layers(self, config)
        self.post_init()


class LolcatsLlamaForCausalLM(LolcatsLlamaPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: LolcatsLlamaConfig):
        LlamaForCausalLM.__init__(self, config)
        _linearize_layers(self.model, config)
        self.post_init()


__all__ = ["LolcatsLlamaForCausalLM", "LolcatsLlamaModel", "LolcatsLlamaPreTrainedModel", "LolcatsAttention",
           "LolcatsCacheLayer", "LolcatsExpert", "LolcatsMoeDecoderLayer", "LolcatsSparseMoe", "LolcatsFeatureMap", "LolcatsSettings", "base_family", "key_sets", "lolcats_attend"]
