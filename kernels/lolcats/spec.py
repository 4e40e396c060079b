"""Static configuration, parameter containers and key-set (mask) definitions of LoLCATS attention.

Notation (used by every module of this package):
  B = batch, T = tokens (query i, key j; positions 0..T-1), H = query heads, K = key/value heads (grouped-query
  attention: H a multiple of K, query head h reads kv head h // G with G = H / K; keys and values are never
  repeated to H heads in memory), D = head dim, F = learned feature dim, F' = final feature dim (2F for fullspace softmax_dim/exp_dim, else F),
  W = window size, C = chunk length, N = number of chunks, R = decode ring length.
  Arrays carry their shape as a suffix (`q_BTHD`, `w_HDF`, `theta_H`); public signatures also use jaxtyping.

Forms (reference §3): for query i with window set 𝒲_i and linear set 𝓛_i, s_ij = q_i·k_j/√D,
c_i = max_{j∈𝒲_i} s_ij, γ = sigmoid(θ), λ = 1 (or 1−γ when `affine`):
  hybrid:  y_i = Σ_j (γ e^{s_ij−c_i}[j∈𝒲_i] + λ f_q,i·f_k,j [j∈𝓛_i]) v_j / Σ_j (same)      (no eps)
  linear:  y_i = Σ_{j≤i} (f_q,i·f_k,j) v_j / (Σ_{j≤i} f_q,i·f_k,j + LINEAR_DENOM_EPS)
  softmax: y_i = Σ_{j≤i} softmax_j(s_ij) v_j                                          (the teacher)
Key sets (`key_sets`):
  sw:          𝒲_i = {i−W < j ≤ i},                         𝓛_i = {j ≤ i−W}
  tk:          blk(t) = t // W;  𝒲_i = {j ≤ i: blk(j) ≥ blk(i)−1},  𝓛_i = {j ≤ i: blk(j) ≤ blk(i)−2}
  tk, compat:  the original's end-aligned blocks blk(t) = (t + o) // W with o = ⌈T/W⌉W − T; when T ≤ W every causal
               key is in BOTH sets (reference §3.4 quirk). Only the reference backend implements it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, NamedTuple

import numpy as np

FORMS = ("hybrid", "linear", "softmax")
WINDOWS = ("sw", "tk")
FEATURE_MAPS = ("softmax_dim", "exp_dim", "relu", "pos_elu")
LINEAR_DENOM_EPS = 1e-12  # added to the denominator of the pure linear form only (reference §3.2)


class Backend(enum.Enum):
    """Implementation of `lolcats_attention`. AUTO resolves by platform (see `api.resolve_backend`)."""

    AUTO = "auto"
    REFERENCE = "reference"
    CHUNKED = "chunked"
    PALLAS = "pallas"
    TRITON = "triton"


@dataclasses.dataclass(frozen=True)
class LolcatsSpec:
    """Static, hashable attention configuration (usable as a `jax.jit` static argument).

    form:        "hybrid" | "linear" | "softmax".
    window:      "sw" (W most recent keys incl. self) | "tk" (terraced: own W-block + previous block, blocks from 0).
    window_size: W.
    feature_map: "softmax_dim" | "exp_dim" | "relu" | "pos_elu" (reference §2.3).
    fullspace:   softmax_dim/exp_dim give [f(u); f(−u)] (F' = 2F) if True, else f(u) (F' = F).
    eps:         clamp(min=eps) applied to every feature value.
    affine:      linear factor λ = 1−γ instead of 1.
    compat:      original end-aligned tk masks incl. the T ≤ W quirk (reference §3.4); reference backend only.
                 Has no effect for window="sw" or form != "hybrid". In decoding it selects the original's
                 sliding-window decoder (reference §3.8).
    chunk_size:  requested chunk length C of chunked backends; they use `chunk_len()` (≥ chunk_size).
    """

    form: str = "hybrid"
    window: str = "tk"
    window_size: int = 64
    feature_map: str = "softmax_dim"
    fullspace: bool = True
    eps: float = 1e-12
    affine: bool = False
    compat: bool = False
    chunk_size: int = 64

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"LolcatsSpec.form={self.form!r} must be one of {FORMS}")
        if self.window not in WINDOWS:
            raise ValueError(f"LolcatsSpec.window={self.window!r} must be one of {WINDOWS}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"LolcatsSpec.feature_map={self.feature_map!r} must be one of {FEATURE_MAPS}")
        if int(self.window_size) < 1:
            raise ValueError(f"LolcatsSpec.window_size={self.window_size} must be >= 1")
        if int(self.chunk_size) < 1:
            raise ValueError(f"LolcatsSpec.chunk_size={self.chunk_size} must be >= 1")
        if not self.eps >= 0:
            raise ValueError(f"LolcatsSpec.eps={self.eps} must be >= 0")

    @property
    def uses_compat_masks(self) -> bool:
        """True when the original end-aligned tk masks apply (only the reference backend can run these)."""
        return self.compat and self.form == "hybrid" and self.window == "tk"

    def feature_out_dim(self, feature_dim: int) -> int:
        """F' for a learned feature dim F."""
        doubled = self.fullspace and self.feature_map in ("softmax_dim", "exp_dim")
        return 2 * feature_dim if doubled else feature_dim

    def chunk_len(self) -> int:
        """Chunk length C used by chunked backends: the smallest C ≥ chunk_size such that every window key of a
        query in chunk n lies in chunk n−1 or n and every key of chunks ≤ n−2 is linear: a multiple of W for tk,
        ≥ W for sw. (For linear/softmax forms: chunk_size itself.)"""
        c, w = int(self.chunk_size), int(self.window_size)
        if self.form != "hybrid":
            return c
        if self.window == "tk":
            return -(-c // w) * w
        return max(c, w)


def kv_group(num_heads: int, num_kv_heads: int, what: str = "k, v") -> int:
    """G = H / K, the query heads per key/value head; a ValueError naming the shapes if K does not divide H."""
    H, K = int(num_heads), int(num_kv_heads)
    if K < 1 or H % K:
        raise ValueError(f"{what} must have K key/value heads dividing the H={H} query heads (grouped-query "
                         f"attention, query head h reads kv head h // (H/K)); got K={K}")
    return H // K


class FeatureMapParams(NamedTuple):
    """Learned Hedgehog projections, one per query head: u = x·w[h] + b[h] (b one scalar per head, T2R option)."""

    wq: Any  # (H, D, F)
    wk: Any  # (H, D, F)
    bq: Any | None = None  # (H,)
    bk: Any | None = None  # (H,)


def key_sets(i, j, seq_len: int, spec: LolcatsSpec):
    """Boolean (in window 𝒲_i, in linear set 𝓛_i) for integer position arrays i (queries), j (keys), broadcast.

    Works on numpy arrays (static masks) and traced jax arrays alike. `seq_len` matters only for compat tk masks.
    Pairs with j > i are in neither set. For form="linear" every causal key is linear, for "softmax" every causal
    key is in the window.
    """
    causal = j <= i
    if spec.form == "linear":
        return causal & False, causal
    if spec.form == "softmax":
        return causal, causal & False
    w = int(spec.window_size)
    if spec.window == "sw":
        return causal & (j > i - w), causal & (j <= i - w)
    offset = 0
    if spec.uses_compat_masks:
        num_blocks = -(-int(seq_len) // w)
        if num_blocks <= 1:  # quirk: roll(blockdiag, -W) is the identity -> both masks true on every causal pair
            return causal, causal
        offset = num_blocks * w - int(seq_len)
    blk_i, blk_j = (i + offset) // w, (j + offset) // w
    return causal & (blk_j >= blk_i - 1), causal & (blk_j <= blk_i - 2)


def key_set_masks(seq_len: int, spec: LolcatsSpec) -> tuple[np.ndarray, np.ndarray]:
    """Static (T, T) numpy masks (window_TT, linear_TT), rows = queries, columns = keys."""
    pos_T = np.arange(int(seq_len))
    return key_sets(pos_T[:, None], pos_T[None, :], seq_len, spec)
