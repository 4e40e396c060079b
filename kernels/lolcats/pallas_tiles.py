"""In-kernel building blocks of the LoLCATS Pallas kernels: static kernel layout, dots, key-set masks and the
fused Hedgehog feature map (forward and backward), all acting on one chunk of one (batch, head).

Notation (as in spec.py): C = chunk length (rows of a tile), D = head dim, V = value-tile width (≤ D),
F = learned feature dim, P = feature parts (2 for fullspace softmax_dim/exp_dim: [act(u); act(−u)], else 1),
F' = P·F, N = chunks, Tp = N·C padded length, T = true length, G = chunks per segment, NS = segments;
H query heads, K key/value heads (grouped-query attention: every kernel runs one program per query head h, which
reads kv head h // (H/K) through its BlockSpec index map, `kv_head`).
Tiles are named `x_CD`, `u_CF`, `s_CC` …; absolute query/key positions are i/j. Everything here is traced inside
a `pallas_call` body, so only ops that the Triton lowering supports are used (2-D dots, iota, where, exp, max/sum
reductions; no concatenate).

Reference beside these kernels: `kernels.lolcats.feature_maps.feature_map` (features) and
`kernels.lolcats.spec.key_sets` (masks), checked by tests/kernels/test_pallas.py.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

NEG_INF = float("-inf")
GAMMA, LAMBDA, BIAS_Q, BIAS_K = range(4)  # columns of the per-head scalars hs_H4 every kernel reads


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """Static description of one kernel instance (hashable: a `custom_vjp` non-diff argument).

    form: "hybrid" | "linear"; window: "sw" | "tk"; window_size: W; chunk: C (power of two ≥ 16, a multiple of W for
    tk, ≥ W for sw); seq_len: true T (rows ≥ T are padding); num_chunks: N; feature_map/fullspace/fm_eps as in
    LolcatsSpec (fm_eps = the clamp eps); den_eps: added to the linear form's denominator; block_v: value tile of
    the forward kernel; seg_chunks: G chunks per program (the sequence is split into segments that run in
    parallel, each starting from the state of all earlier chunks, summed by pallas_hybrid_state.py);
    num_warps/num_stages: Triton compiler parameters (forward, backward).
    """

    form: str
    window: str
    window_size: int
    chunk: int
    seq_len: int
    num_chunks: int
    feature_map: str
    fullspace: bool
    fm_eps: float
    den_eps: float
    block_v: int
    seg_chunks: int = 16
    num_warps_fwd: int = 8
    num_warps_bwd: int = 8
    num_stages: int = 1

    @property
    def num_segments(self) -> int:
        return -(-self.num_chunks // self.seg_chunks)

    @property
    def shift(self) -> int:
        """lag − 1: the state update of iteration n absorbs chunk n − shift (forward) / query chunk m + shift."""
        return self.lag - 1

    def segment(self, s):
        """[n0, n1): the chunks of segment s (one program per segment; the last one may be shorter)."""
        n0 = s * self.seg_chunks
        return n0, jnp.minimum(n0 + self.seg_chunks, self.num_chunks)

    @property
    def has_window(self) -> bool:
        return self.form == "hybrid"

    @property
    def num_parts(self) -> int:
        return 2 if self.fullspace and self.feature_map in ("softmax_dim", "exp_dim") else 1

    @property
    def lag(self) -> int:
        """Chunks ≤ n − lag are seen only through the linear state by queries of chunk n."""
        return 2 if self.has_window else 1

    def linear_in(self, block: str) -> bool:
        """Whether a (query chunk n, key chunk n − d) tile can hold linear-set pairs; block "cur" (d=0) or "prev"
        (d=1). Static: lets the kernels skip feature dots that are all masked (tk with C = W: none)."""
        C, W = self.chunk, self.window_size
        if not self.has_window:
            return block == "cur"
        if self.window == "sw":
            return block == "prev" or C > W
        return C >= (3 if block == "cur" else 2) * W

    @property
    def blocks(self) -> tuple[str, ...]:
        """Key chunks a query chunk sees directly (besides the state): ("cur", "prev") for hybrid, ("cur",)."""
        return ("cur", "prev") if self.has_window else ("cur",)


def kv_head(h, group: int):
    """The kv head h // group read by query head h (group = H/K query heads per kv head), for BlockSpec index maps
    (integer division of the non-negative program id; the identity, with no division op, for group 1)."""
    return h if group == 1 else lax.div(h, group)


# --------------------------------------------------------------------------------------------- dots


def mm(a, b, dtype):
    """a @ b with operands cast to `dtype`, float32 accumulation."""
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def mm_t(a, b, dtype):
    """a @ bᵀ (contract the last dims)."""
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)


def mm_tn(a, b, dtype):
    """aᵀ @ b (contract the first dims)."""
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def rowsum(x):
    return jnp.sum(x, axis=1)


# --------------------------------------------------------------------------------------------- masks


def positions(start, size: int, axis: int, shape):
    """Absolute positions start + iota along `axis` of a `shape` tile (int32)."""
    return lax.broadcasted_iota(jnp.int32, shape, axis) + start


def key_set_tile(i0, j0, lay: KernelLayout, block: str):
    """(window_CC | None, linear_CC | None) for queries i0 + r and keys j0 + c (j may be negative: masked).

    Matches spec.key_sets (start-aligned tk blocks, sw last-W window); None where statically empty.
    """
    C = lay.chunk
    i = positions(i0, C, 0, (C, C))
    j = positions(j0, C, 1, (C, C))
    causal = (j <= i) & (j >= 0)
    lin_possible = lay.linear_in(block)
    if not lay.has_window:
        return None, causal
    W = lay.window_size
    if lay.window == "sw":
        win = causal & (j > i - W)
        lin = (causal & (j <= i - W)) if lin_possible else None
        return win, lin
    bi, bj = lax.div(i, W), lax.div(jnp.maximum(j, 0), W)
    win = causal & (bj >= bi - 1)
    lin = (causal & (bj <= bi - 2)) if lin_possible else None
    return win, lin


# --------------------------------------------------------------------------------------------- feature map


def _act(v_CF, name: str):
    """One half of φ before the clamp: softmax / exp(v − max v) / relu / 1 + elu over the feature axis."""
    if name == "softmax_dim":
        e = jnp.exp(v_CF - jnp.max(v_CF, axis=1, keepdims=True))
        return e / jnp.sum(e, axis=1, keepdims=True)
    if name == "exp_dim":
        return jnp.exp(v_CF - jnp.max(v_CF, axis=1, keepdims=True))
    if name == "relu":
        return jnp.maximum(v_CF, 0.0)
    if name == "pos_elu":
        return jnp.where(v_CF > 0, v_CF + 1.0, jnp.exp(jnp.minimum(v_CF, 0.0)))
    raise ValueError(f"unknown feature map {name!r}")


def _act_bwd(v_CF, a_CF, da_CF, name: str):
    """d(loss)/dv given da = d(loss)/d act(v) (jnp semantics: max ties share the gradient equally)."""
    if name == "softmax_dim":
        return a_CF * (da_CF - jnp.sum(a_CF * da_CF, axis=1, keepdims=True))
    if name == "exp_dim":
        g = a_CF * da_CF
        is_max = (v_CF == jnp.max(v_CF, axis=1, keepdims=True)).astype(jnp.float32)
        share = jnp.sum(g, axis=1, keepdims=True) / jnp.sum(is_max, axis=1, keepdims=True)
        return g - is_max * share
    if name == "relu":
        return jnp.where(v_CF > 0, da_CF, 0.0)
    if name == "pos_elu":
        return jnp.where(v_CF > 0, da_CF, da_CF * a_CF)
    raise ValueError(f"unknown feature map {name!r}")


def features(x_CD, w_DF, b, lay: KernelLayout, dtype):
    """(u_CF, acts, feats): u = x·w + b; acts[p] = act(±u) before the clamp; feats[p] = max(acts[p], eps)."""
    u_CF = mm(x_CD, w_DF, dtype) + b
    signs = (1.0, -1.0)[: lay.num_parts]
    acts = tuple(_act(s * u_CF, lay.feature_map) for s in signs)
    feats = tuple(jnp.maximum(a, lay.fm_eps) for a in acts)
    return u_CF, acts, feats


def features_bwd(u_CF, acts, dfeats, lay: KernelLayout):
    """du_CF from the feature cotangents dfeats[p] (clamp passes the gradient where act > eps)."""
    du_CF = jnp.zeros_like(u_CF)
    for sign, a_CF, df_CF in zip((1.0, -1.0), acts, dfeats):
        da_CF = jnp.where(a_CF > lay.fm_eps, df_CF, 0.0)
        du_CF = du_CF + sign * _act_bwd(sign * u_CF, a_CF, da_CF, lay.feature_map)
    return du_CF


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def row_guard(n, lay: KernelLayout):
    """valid_C: rows (queries) of chunk n that are real tokens, not padding."""
    return positions(n * lay.chunk, lay.chunk, 0, (lay.chunk,)) < lay.seq_len



def query_side(n, q_ref, dy_ref, y_ref, den_ref, lay: KernelLayout):
    """q_CD, g_CD = dy/den, δ_C = dy·y/den of query chunk n (zero on padding rows), for the backward kernels."""
    rows = pl.ds(n * lay.chunk, lay.chunk)
    valid = row_guard(n, lay)
    dy_CD = dy_ref[rows, :].astype(jnp.float32)
    den_C = den_ref[rows]
    g_CD = jnp.where(valid[:, None], dy_CD / den_C[:, None], 0.0)
    delta_C = jnp.where(valid, rowsum(dy_CD * y_ref[rows, :].astype(jnp.float32)) / den_C, 0.0)
    return q_ref[rows, :], g_CD, delta_C


def load_state(S_ref, z_ref, lay: KernelLayout, F: int):
    """Per-part state tiles (S_p (F, X), z_p (F,)) from refs holding P·F rows."""
    parts = range(lay.num_parts)
    return (tuple(S_ref[pl.ds(p * F, F), :] for p in parts), tuple(z_ref[pl.ds(p * F, F)] for p in parts))


def store_state(S_ref, z_ref, S, z, F: int):
    for p, (S_FX, z_F) in enumerate(zip(S, z)):
        S_ref[pl.ds(p * F, F), :] = S_FX
        z_ref[pl.ds(p * F, F)] = z_F
