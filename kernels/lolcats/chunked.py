"""Chunked linear-time LoLCATS attention in pure JAX with a recomputing custom VJP (the CPU default backend).

Notation: B batch, T tokens, H query heads, K key/value heads, G = H/K, D head dim, Dv value dim, F' feature dim,
C chunk length (spec.chunk_len()), N = ⌈T/C⌉ chunks, S = 2C keys of a span (previous chunk + current chunk).
Chunked arrays are [N, B, K, G, C, X] for query-head quantities (q, f_q, f_k, y, states: query head h = k·G + g)
and [N, B, K, C, X] for keys and values, which are read by grouped einsums and never repeated to H heads; their
gradients sum over the group.

Hybrid / linear forms. The sequence is padded to N·C and split into chunks. For query chunk n the keys of chunks
n−1 and n (the span) are handled exactly — window logits with the window max c_i, and any linear pairs inside the
span — and all keys of chunks ≤ n−2 through the state S_n = Σ f_kᵀ v (F'×Dv), z_n = Σ f_k (F'), which is valid
because C is a multiple of W (tk) or ≥ W (sw): every window key lies in the span and every older key is linear.
Masks of a span are translation invariant (static (C, S) arrays); at n = 0 the previous-chunk half is masked out.

  P_ij  = γ e^{s_ij−c_i}[j∈𝒲_i] + λ f_q,i·f_k,j [j∈𝓛_i]        (span pairs)
  num_i = Σ_span P_ij v_j + λ f_q,i S_n,   den_i = Σ_span P_ij + λ f_q,i·z_n + ε,   y_i = num_i / den_i
  (ε = LINEAR_DENOM_EPS for form="linear", whose P is f_q·f_k on every causal pair, else 0.)

Forward: one `lax.scan` over chunks carrying (S, z) and the previous chunk's k, v, f_k; it saves y and den (O(T)).
Backward (custom VJP, nothing of size F'×Dv stored per chunk):
  1. dnum = dy/den, dden = −(dy·y)/den;
  2. a forward scan recomputing (S_n, z_n) that yields the span gradients (q, span k/v/f_k, f_q, γ, λ) and the
     state→query terms f_q ← λ(dnum S_nᵀ + dden z_n);
  3. a reverse scan carrying G_n = Σ_{m ≥ n+2} dS_m (dS_m = λ f_q,mᵀ dnum_m, likewise dz) that yields the
     state→key terms f_k,j ← G v_j + g_z, v_j ← G f_k,j.
Gradients to the feature-map weights and θ flow by ordinary autodiff through `feature_map` and `window_factors`.

Chunk scans of at most UNROLL_MAX_CHUNKS chunks are unrolled in full: XLA then sees static chunk indices (the first
chunk's masks fold to constants, outputs are concatenated instead of written into a loop buffer) and no while-loop
carry copies. One SmolLM2 layer's value-and-grad on 2 CPU cores (benchmarks/results/train_steps_cpu.md): T = 256
(4 chunks) ~19 → ~13 ms; T = 1,024 (16) ~10-20 % faster for ~14 s more compile; T = 4,096 (64) slower (469 → 580
ms) and 83 s of compile, so longer inputs keep the loop.

Softmax form (the teacher): exact causal softmax over query chunks (`lax.map` of a rematerialised block), so
neither direction holds a (T, T) map.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from kernels.lolcats.feature_maps import compute_dtype, query_key_features, window_factors
from kernels.lolcats.spec import LINEAR_DENOM_EPS, FeatureMapParams, LolcatsSpec, key_sets


UNROLL_MAX_CHUNKS = 16  # chunk scans over at most this many chunks are unrolled in full (see the module docstring)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Hashable static configuration of the custom-VJP core."""

    chunk: int
    has_window: bool
    has_linear_span: bool  # some linear pair inside a span (False e.g. for tk with C = W: the span is all window)
    den_eps: float
    win_CS: tuple  # (C, 2C) bool masks as nested tuples (hashable)
    lin_CS: tuple
    unroll_max: int  # UNROLL_MAX_CHUNKS when built

    def unroll(self, num_chunks: int) -> int:
        """`lax.scan`'s unroll for a scan over `num_chunks` chunks: all of them, or 1 (a loop)."""
        return num_chunks if num_chunks <= self.unroll_max else 1

    @property
    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.win_CS, bool), np.asarray(self.lin_CS, bool)


def _make_static(spec: LolcatsSpec) -> _Static:
    C = spec.chunk_len()
    i = C + np.arange(C)[:, None]  # query positions of chunk 1, keys of chunks 0 and 1 (translation invariant)
    j = np.arange(2 * C)[None, :]
    win, lin = key_sets(i, j, 2 * C, spec)
    win, lin = np.broadcast_to(win, (C, 2 * C)), np.broadcast_to(lin, (C, 2 * C))
    eps = LINEAR_DENOM_EPS if spec.form == "linear" else 0.0
    return _Static(C, spec.form == "hybrid", bool(lin.any()), eps, tuple(map(tuple, win.tolist())),
                   tuple(map(tuple, lin.tolist())), UNROLL_MAX_CHUNKS)


def _span_masks(st: _Static, n) -> tuple[Array, Array]:
    """(window, linear) masks (C, 2C) of chunk n: the previous-chunk half is invalid at n = 0."""
    win, lin = st.masks
    valid = jnp.concatenate([jnp.full((st.chunk,), n > 0), jnp.ones((st.chunk,), bool)])
    return jnp.asarray(win) & valid, jnp.asarray(lin) & valid


def _span_weights(st: _Static, n, q, k_span, fq, fk_span, g, l):
    """Span weights of query chunk n: P, the parts E (masked e^{s−c}) and L (masked f_q·f_k), the window logits
    s_win and max c, and the (window, linear) masks — the last four for the backward. Query-side arrays are
    (B, K, G, C, ·), k_span (B, K, 2C, D); g, l are (1, K, G, 1, 1)."""
    win, lin = _span_masks(st, n)
    L = jnp.where(lin, jnp.einsum("bkgif,bkgjf->bkgij", fq, fk_span), 0.0) if st.has_linear_span else None
    if not st.has_window:
        return l * L, None, L, None, None, (win, lin)
    scale = 1.0 / np.sqrt(q.shape[-1])
    s_win = jnp.where(win, jnp.einsum("bkgid,bkjd->bkgij", q, k_span) * scale, -jnp.inf)
    c = jnp.max(s_win, axis=-1, keepdims=True)  # finite: the diagonal is always a window key
    E = jnp.where(win, jnp.exp(s_win - c), 0.0)
    return (g * E if L is None else g * E + l * L), E, L, s_win, c, (win, lin)


def _state_update(S, z, fk, v):
    """S += Σ_j f_k,j v_jᵀ, z += Σ_j f_k,j over one chunk: fk (B, K, G, C, F'), v (B, K, C, Dv)."""
    return S + jnp.einsum("bkgjf,bkjd->bkgfd", fk, v), z + jnp.sum(fk, axis=3)


def _fwd_scan(st: _Static, q, k, v, fq, fk, gamma_KG, lam_KG):
    """Forward pass over chunks; returns y and den, chunked ([N,B,K,G,C,Dv], [N,B,K,G,C])."""
    N, B, K, G, C, _ = q.shape
    Fp, Dv = fq.shape[-1], v.shape[-1]
    g, l = gamma_KG[None, :, :, None, None], lam_KG[None, :, :, None, None]

    def step(carry, xs):
        S, z, k_prev, v_prev, fk_prev = carry
        n, q_n, k_n, v_n, fq_n, fk_n = xs
        k_span, v_span = jnp.concatenate([k_prev, k_n], 2), jnp.concatenate([v_prev, v_n], 2)
        P, *_ = _span_weights(st, n, q_n, k_span, fq_n, jnp.concatenate([fk_prev, fk_n], 3), g, l)
        num = jnp.einsum("bkgij,bkjd->bkgid", P, v_span) + l * jnp.einsum("bkgif,bkgfd->bkgid", fq_n, S)
        den = jnp.sum(P, axis=-1) + l[..., 0] * jnp.einsum("bkgif,bkgf->bkgi", fq_n, z) + st.den_eps
        S, z = _state_update(S, z, fk_prev, v_prev)  # chunk n−1 leaves the span: it is linear for chunks ≥ n+1
        return (S, z, k_n, v_n, fk_n), (num / den[..., None], den)

    dtype = q.dtype
    init = (jnp.zeros((B, K, G, Fp, Dv), dtype), jnp.zeros((B, K, G, Fp), dtype), jnp.zeros_like(k[0]),
            jnp.zeros_like(v[0]), jnp.zeros_like(fk[0]))
    _, (y, den) = lax.scan(step, init, (jnp.arange(N), q, k, v, fq, fk), unroll=st.unroll(N))
    return y, den


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_core(st: _Static, q, k, v, fq, fk, gamma_KG, lam_KG):
    return _fwd_scan(st, q, k, v, fq, fk, gamma_KG, lam_KG)[0]


def _core_fwd(st, q, k, v, fq, fk, gamma_KG, lam_KG):
    y, den = _fwd_scan(st, q, k, v, fq, fk, gamma_KG, lam_KG)
    return y, (q, k, v, fq, fk, gamma_KG, lam_KG, y, den)


def _core_bwd(st, res, dy):
    q, k, v, fq, fk, gamma_KG, lam_KG, y, den = res
    N, B, K, G, C, D = q.shape
    Fp, Dv = fq.shape[-1], v.shape[-1]
    g, l = gamma_KG[None, :, :, None, None], lam_KG[None, :, :, None, None]
    dnum = dy / den[..., None]  # [N,B,K,G,C,Dv]
    dden = -jnp.sum(dy * y, axis=-1) / den  # [N,B,K,G,C]
    scale = 1.0 / np.sqrt(D)

    def span_step(carry, xs):
        S, z, k_prev, v_prev, fk_prev, dg, dl = carry
        n, q_n, k_n, v_n, fq_n, fk_n, dnum_n, dden_n = xs
        k_span, v_span = jnp.concatenate([k_prev, k_n], 2), jnp.concatenate([v_prev, v_n], 2)
        fk_span = jnp.concatenate([fk_prev, fk_n], 3)
        P, E, L, s_win, c, (win, lin) = _span_weights(st, n, q_n, k_span, fq_n, fk_span, g, l)
        dP = jnp.einsum("bkgid,bkjd->bkgij", dnum_n, v_span) + dden_n[..., None]
        dv_span = jnp.einsum("bkgij,bkgid->bkjd", P, dnum_n)  # Σ over the group's query heads
        fqS = jnp.einsum("bkgif,bkgfd->bkgid", fq_n, S)
        fqz = jnp.einsum("bkgif,bkgf->bkgi", fq_n, z)
        dl = dl + jnp.einsum("bkgid,bkgid->kg", fqS, dnum_n) + jnp.einsum("bkgi,bkgi->kg", dden_n, fqz)
        dfq = l * (jnp.einsum("bkgid,bkgfd->bkgif", dnum_n, S) + dden_n[..., None] * z[:, :, :, None, :])
        if st.has_linear_span:
            dl = dl + jnp.einsum("bkgij,bkgij->kg", dP, L)
            dL = jnp.where(lin, l * dP, 0.0)
            dfq = dfq + jnp.einsum("bkgij,bkgjf->bkgif", dL, fk_span)
            dfk_span = jnp.einsum("bkgij,bkgif->bkgjf", dL, fq_n)
        else:  # no linear pair in the span: its keys' features get gradient only through the states
            dfk_span = jnp.zeros_like(fk_span)
        if st.has_window:
            dg = dg + jnp.einsum("bkgij,bkgij->kg", dP, E)
            t = jnp.where(win, g * dP * E, 0.0)  # d/ds of e^{s−c} at fixed c
            at_max = (s_win == c).astype(t.dtype)  # the max's gradient is split equally among ties (as jnp.max)
            ds = t - at_max / jnp.sum(at_max, -1, keepdims=True) * jnp.sum(t, -1, keepdims=True)
            dq = jnp.einsum("bkgij,bkjd->bkgid", ds, k_span) * scale
            dk_span = jnp.einsum("bkgij,bkgid->bkjd", ds, q_n) * scale
        else:
            dq, dk_span = jnp.zeros_like(q_n), jnp.zeros_like(k_span)
        S, z = _state_update(S, z, fk_prev, v_prev)
        out = (dq, dk_span[:, :, :C], dk_span[:, :, C:], dv_span[:, :, :C], dv_span[:, :, C:],
               dfq, dfk_span[:, :, :, :C], dfk_span[:, :, :, C:])
        return (S, z, k_n, v_n, fk_n, dg, dl), out

    zeros_kg = jnp.zeros((K, G), q.dtype)
    init = (jnp.zeros((B, K, G, Fp, Dv), q.dtype), jnp.zeros((B, K, G, Fp), q.dtype), jnp.zeros_like(k[0]),
            jnp.zeros_like(v[0]), jnp.zeros_like(fk[0]), zeros_kg, zeros_kg)
    (_, _, _, _, _, dg, dl), outs = lax.scan(span_step, init, (jnp.arange(N), q, k, v, fq, fk, dnum, dden),
                                             unroll=st.unroll(N))
    dq, dk_p, dk_c, dv_p, dv_c, dfq, dfk_p, dfk_c = outs

    def shift_add(cur, prev_part):  # span part for "previous chunk" of step n+1 belongs to chunk n
        return cur + jnp.concatenate([prev_part[1:], jnp.zeros_like(prev_part[:1])], 0)

    dk, dv, dfk = shift_add(dk_c, dk_p), shift_add(dv_c, dv_p), shift_add(dfk_c, dfk_p)

    def state_step(carry, xs):
        G_S, G_z, dS_next, dz_next = carry  # G = Σ_{m ≥ n+2} dS_m; dS_next = dS_{n+1}
        fq_n, dnum_n, dden_n, fk_n, v_n = xs
        dfk_n = jnp.einsum("bkjd,bkgfd->bkgjf", v_n, G_S) + G_z[:, :, :, None, :]
        dv_n = jnp.einsum("bkgjf,bkgfd->bkjd", fk_n, G_S)
        dS_n = l * jnp.einsum("bkgif,bkgid->bkgfd", fq_n, dnum_n)
        dz_n = l[..., 0] * jnp.einsum("bkgif,bkgi->bkgf", fq_n, dden_n)
        return (G_S + dS_next, G_z + dz_next, dS_n, dz_n), (dfk_n, dv_n)

    zS, zz = jnp.zeros((B, K, G, Fp, Dv), q.dtype), jnp.zeros((B, K, G, Fp), q.dtype)
    _, (dfk_state, dv_state) = lax.scan(state_step, (zS, zz, zS, zz), (fq, dnum, dden, fk, v), reverse=True,
                                        unroll=st.unroll(N))
    return dq, dk, dv + dv_state, dfq, dfk + dfk_state, dg, dl


_chunked_core.defvjp(_core_fwd, _core_bwd)


def _to_chunks(x_BTHX, C: int) -> Array:
    """[B, T, H, X] → zero-padded [N, B, H, C, X]."""
    B, T, H, X = x_BTHX.shape
    N = -(-T // C)
    x = jnp.pad(x_BTHX, ((0, 0), (0, N * C - T), (0, 0), (0, 0)))
    return x.reshape(B, N, C, H, X).transpose(1, 0, 3, 2, 4)


def _grouped(x_NBHCX, K: int) -> Array:
    """[N, B, H, C, X] → [N, B, K, G, C, X] (query head h = k·G + g reads kv head k)."""
    N, B, H, C, X = x_NBHCX.shape
    return x_NBHCX.reshape(N, B, K, H // K, C, X)


def _from_chunks(x_NBHCX, T: int) -> Array:
    N, B, H, C, X = x_NBHCX.shape
    return x_NBHCX.transpose(1, 0, 3, 2, 4).reshape(B, N * C, H, X)[:, :T]


def _softmax_chunked(q_BTHD, k_BTKD, v_BTKD, C: int) -> Array:
    """Exact causal softmax (1/√D) over query chunks of C rows; each block is rematerialised in the backward.
    k, v have K ≤ H heads (grouped einsums, no repeat)."""
    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    q_N = _grouped(_to_chunks(q_BTHD, C), K)
    pos_T = jnp.arange(T)
    scale = 1.0 / np.sqrt(D)

    @jax.checkpoint
    def block(args):
        n, q_BKGCD = args
        s_BKGCT = jnp.einsum("bkgid,bjkd->bkgij", q_BKGCD, k_BTKD) * scale
        causal_CT = pos_T[None, :] <= n * C + jnp.arange(C)[:, None]
        a_BKGCT = jax.nn.softmax(jnp.where(causal_CT, s_BKGCT, -jnp.inf), axis=-1)
        y = jnp.einsum("bkgij,bjkd->bkgid", a_BKGCT, v_BTKD)
        return y.reshape(B, H, C, y.shape[-1])

    return _from_chunks(lax.map(block, (jnp.arange(q_N.shape[0]), q_N)), T)


def lolcats_attention_chunked(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K Dv"],
    fmap: FeatureMapParams,
    theta_H: Float[Array, "H"] | None,
    spec: LolcatsSpec,
) -> Float[Array, "B T H Dv"]:
    """Chunked backend of `lolcats_attention` (same math as the reference, O(T) memory in both directions);
    k, v with K ≤ H heads are read by grouped einsums, never repeated."""
    if spec.uses_compat_masks:
        raise ValueError("the chunked backend implements start-aligned tk blocks only; spec.compat=True with "
                         "window='tk' needs Backend.REFERENCE")
    dtype = compute_dtype(q.dtype)
    T = q.shape[1]
    if spec.form == "softmax":
        return _softmax_chunked(q.astype(dtype), k.astype(dtype), v.astype(dtype), spec.chunk_size).astype(q.dtype)
    st = _make_static(spec)
    fq, fk = query_key_features(q, k, fmap, spec)  # both (B, T, H, F'): one key map per query head
    H, K = q.shape[2], k.shape[2]
    if spec.form == "hybrid":
        if theta_H is None:
            raise ValueError(f"form='hybrid' needs theta_H of shape (H,) = ({H},), got None")
        gamma_H, lam_H = window_factors(theta_H, spec, dtype)
    else:
        gamma_H, lam_H = jnp.zeros((H,), dtype), jnp.ones((H,), dtype)
    per_query = [_grouped(_to_chunks(x, st.chunk), K) for x in (q.astype(dtype), fq, fk)]
    per_kv = [_to_chunks(x.astype(dtype), st.chunk) for x in (k, v)]
    q_c, fq_c, fk_c = per_query
    y = _chunked_core(st, q_c, *per_kv, fq_c, fk_c, gamma_H.reshape(K, -1), lam_H.reshape(K, -1))
    N, B, _, G, C, Dv = y.shape
    return _from_chunks(y.reshape(N, B, H, C, Dv), T).astype(q.dtype)
