"""LoLCATS attention as fused Pallas kernels (Triton lowering on NVIDIA GPUs; interpret mode elsewhere).

Notation: B batch, T tokens, Tp = T padded to a multiple of the chunk C, H query heads, K key/value heads, D head
dim, Dv value dim, F learned feature dim (see spec.py). Layout [B, T, ·, D], post-RoPE: q has H heads, k and v K
heads dividing H (grouped-query attention: query head h reads kv head h // (H/K) inside the kernels, through the
BlockSpec index maps; k and v are never repeated to H heads). Feature maps, θ and biases are per query head.

Reads top-down: `PallasConfig` (tunables) → `make_layout` (static kernel layout, validated) → the `custom_vjp`
op on padded arrays (forward kernel in pallas_hybrid_fwd.py, backward kernels in pallas_hybrid_bwd.py) → the
public `pallas_lolcats_attention`, which pads T, folds θ / biases into one (H, 4) array of per-head scalars and
slices the result. Forms: "hybrid" (sw | tk windows, start-aligned tk blocks) and "linear"; "softmax" (the teacher)
is delegated to `jax.nn.dot_product_attention`. Gradients flow to q, k, v, wq, wk, bq, bk and θ.
Reference: kernels.lolcats.reference.lolcats_attention_reference (tests/kernels/test_pallas.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from kernels.lolcats.feature_maps import window_factors
from kernels.lolcats.pallas_hybrid_bwd import backward_call
from kernels.lolcats.pallas_hybrid_fwd import forward_call
from kernels.lolcats.pallas_tiles import KernelLayout
from kernels.lolcats.spec import LINEAR_DENOM_EPS, FeatureMapParams, LolcatsSpec, kv_group

MIN_TILE = 16  # Triton tensor-core dots need every tile dim ≥ 16


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """Tunables of the Pallas backend.

    chunk:      C; None → spec.chunk_len() rounded up to a power of two ≥ 16.
    block_v:    value tile of the forward kernel; None → min(Dv, 64).
    seg_chunks: chunks per program; segments run in parallel from precomputed states (more programs than
                batch × heads, which alone would leave most of a GPU idle). None → sized from the GPU's SM count
                (`default_seg_chunks`): enough segments that batch × heads × segments backward programs cover every
                SM (B = 1, H = 32, T = 1024 on 132 SMs: 6 segments of 3 chunks, 192 programs instead of 32), and
                one segment (no state pass) when batch × heads alone does.
    num_warps_fwd / num_warps_bwd / num_stages: Triton compiler parameters (num_stages > 1 pipelines the chunk
                loads but exceeds the shared memory of an H100 in the backward kernels at D = 128). Forward 8 warps:
                at Llama-3.1-8B shapes ptxas spills about half as much as with 4 (benchmarks/results/ptxas_sm90.md).
    interpret:  run the kernels in Pallas interpret mode; None → interpret unless the default backend is a GPU.
    """

    chunk: int | None = None
    block_v: int | None = None
    seg_chunks: int | None = None
    num_warps_fwd: int = 8
    num_warps_bwd: int = 8
    num_stages: int = 1
    interpret: bool | None = None

    def resolve_interpret(self) -> bool:
        return jax.default_backend() != "gpu" if self.interpret is None else bool(self.interpret)


H100_SMS = 132  # streaming multiprocessors assumed when compiling without a GPU (offline lowering)
INTERPRET_SEG_CHUNKS = 16  # interpret mode (CPU): no SMs to fill


def num_sms() -> int:
    """The first GPU's SM count (`core_count`), or H100_SMS without a GPU."""
    if jax.default_backend() == "gpu":
        count = getattr(jax.devices()[0], "core_count", None)
        if count:
            return int(count)
    return H100_SMS


def default_seg_chunks(num_chunks: int, batch_heads: int, sms: int) -> int:
    """Chunks per segment so that batch_heads × segments (the backward kernels' programs; the forward has as many
    per value tile) is at least `sms`: floor(N / ⌈sms / (B·H)⌉), ≥ 1. One segment when B·H ≥ sms."""
    wanted = -(-int(sms) // max(1, int(batch_heads)))
    return max(1, int(num_chunks) // max(1, min(wanted, int(num_chunks))))


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def make_layout(spec: LolcatsSpec, T: int, D: int, Dv: int, F: int, cfg: PallasConfig,
                interpret: bool, batch_heads: int = 1) -> KernelLayout:
    """Validated static layout; errors name the offending values. batch_heads = B·H sizes the default segments."""
    if spec.form not in ("hybrid", "linear"):
        raise ValueError(f"the Pallas kernels implement form 'hybrid' and 'linear', not {spec.form=}")
    if spec.uses_compat_masks:
        raise ValueError("spec.compat=True tk masks (end-aligned blocks) are implemented by Backend.REFERENCE only")
    W = int(spec.window_size)
    C = int(cfg.chunk) if cfg.chunk is not None else max(MIN_TILE, _next_pow2(spec.chunk_len()))
    if not _pow2(C):
        raise ValueError(f"chunk {C=} must be a power of two (Triton block shapes)")
    if spec.form == "hybrid" and spec.window == "tk" and C % W:
        raise ValueError(f"tk windows need the chunk {C=} to be a multiple of the window {W=} "
                         f"(the Pallas kernels need W to be a power of two)")
    if spec.form == "hybrid" and spec.window == "sw" and C < W:
        raise ValueError(f"sw windows need chunk {C=} ≥ window {W=}")
    V = int(cfg.block_v) if cfg.block_v is not None else min(Dv, 64)
    if Dv % V:
        raise ValueError(f"value dim {Dv=} must be a multiple of block_v={V}")
    if not interpret:
        for name, value in (("chunk C", C), ("head dim D", D), ("value dim Dv", Dv), ("feature dim F", F),
                            ("block_v", V)):
            if not (_pow2(value) and value >= MIN_TILE):
                raise ValueError(f"{name}={value} must be a power of two ≥ {MIN_TILE} for the Triton lowering")
    N = max(1, -(-int(T) // C))
    if cfg.seg_chunks is not None:
        seg = max(1, int(cfg.seg_chunks))
    else:
        seg = INTERPRET_SEG_CHUNKS if interpret else default_seg_chunks(N, batch_heads, num_sms())
    return KernelLayout(
        form=spec.form, window=spec.window, window_size=W, chunk=C, seq_len=int(T), num_chunks=N,
        feature_map=spec.feature_map, fullspace=bool(spec.fullspace), fm_eps=float(spec.eps),
        den_eps=LINEAR_DENOM_EPS if spec.form == "linear" else 0.0, block_v=V, seg_chunks=seg,
        num_warps_fwd=cfg.num_warps_fwd, num_warps_bwd=cfg.num_warps_bwd, num_stages=cfg.num_stages)


def unsupported_reason(spec: LolcatsSpec, q_shape, v_shape, feature_dim: int, config: PallasConfig = PallasConfig()
                       ) -> str | None:
    """None if these kernels run `spec` at these shapes (compiled, not interpreted), else why not — for a caller
    such as Backend.AUTO resolution that prefers falling back to the chunked backend over an error. q_shape
    (B, T, H, D), v_shape (B, T, K, Dv) with K dividing H."""
    try:
        kv_group(q_shape[2], v_shape[2], f"v {tuple(v_shape)} (q {tuple(q_shape)})")
        if spec.form == "softmax":
            return None
        make_layout(spec, q_shape[1], q_shape[-1], v_shape[-1], feature_dim, config, interpret=False)
    except ValueError as err:
        return str(err)
    return None


# --------------------------------------------------------------------------------------------- custom_vjp op


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _lolcats_padded(q, k, v, wq, wk, hs_H4, lay: KernelLayout, interpret: bool):
    """y (B, Tp, H, Dv) for padded q (B, Tp, H, D), k, v (B, Tp, K, ·); hs_H4 = per-head [γ, λ, b_q, b_k]
    (float32)."""
    return forward_call(q, k, v, wq, wk, hs_H4, lay, interpret)[0]


def _lolcats_padded_fwd(q, k, v, wq, wk, hs_H4, lay, interpret):
    y, *stats = forward_call(q, k, v, wq, wk, hs_H4, lay, interpret)
    return y, (q, k, v, wq, wk, hs_H4, y, *stats)


def lolcats_padded_bwd(lay, interpret, res, dy):
    """Backward of the padded op from its residuals (shared with the Triton forward of triton_hybrid.py).

    Weight gradients dW[h] = Σ_{b,t} x_{b,t,h//(H/K)}ᵀ du_{b,t,h} with x = q (K = H) or k (K kv heads; the grouped
    einsum reads each kv head once for its H/K query heads, no repeated k); bias gradients db[h] = Σ du[·, ·, h]."""
    q, k, v, wq, wk, hs_H4, y, c_BHT, den_BHT, S0, z0 = res
    dq, dk, dv, duq, duk, rw, rl = backward_call(q, k, v, wq, wk, hs_H4, y, c_BHT, den_BHT, S0, z0,
                                                 dy.astype(y.dtype), lay, interpret)

    def weight_grad(x_BTKD, du_BTHF, w_HDF):
        B, T, K, D = x_BTKD.shape
        H, _, F = w_HDF.shape
        du_BTKGF = du_BTHF.astype(x_BTKD.dtype).reshape(B, T, K, H // K, F)
        dw_KGDF = jnp.einsum("btkd,btkgf->kgdf", x_BTKD, du_BTKGF, preferred_element_type=jnp.float32)
        return dw_KGDF.reshape(H, D, F).astype(w_HDF.dtype)

    dhs_H4 = jnp.stack([rw.sum((0, 2)), rl.sum((0, 2)), duq.sum((0, 1, 3)), duk.sum((0, 1, 3))], axis=-1)
    return dq, dk, dv, weight_grad(q, duq, wq), weight_grad(k, duk, wk), dhs_H4.astype(hs_H4.dtype)


_lolcats_padded.defvjp(_lolcats_padded_fwd, lolcats_padded_bwd)


# --------------------------------------------------------------------------------------------- public wrapper


def pallas_lolcats_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K Dv"],
    fmap: FeatureMapParams,
    theta_H: Float[Array, "H"] | None,
    spec: LolcatsSpec,
    config: PallasConfig = PallasConfig(),
) -> Float[Array, "B T H Dv"]:
    """LoLCATS attention of spec.form with the fused Pallas kernels; y in q's dtype (float32 accumulation).

    k, v have K heads dividing H (grouped-query attention; query head h reads kv head h // (H/K)), never repeated.
    Dots take q's dtype as operand type (bf16 inputs → bf16 tensor-core dots, float32 accumulation and state).
    """
    check_shapes(q, k, v)
    if spec.form == "softmax":
        return _softmax_teacher(q, k, v)
    B, T, H, D = q.shape
    interpret = config.resolve_interpret()
    lay = make_layout(spec, T, D, v.shape[-1], fmap.wq.shape[-1], config, interpret, batch_heads=B * H)
    qp, kp, vp, hs_H4 = prepare_inputs(q, k, v, fmap, theta_H, spec, lay)
    return _lolcats_padded(qp, kp, vp, fmap.wq, fmap.wk, hs_H4, lay, interpret)[:, :T]


def check_shapes(q, k, v) -> int:
    """G = H/K for q (B, T, H, D), k (B, T, K, D), v (B, T, K, Dv); a ValueError naming the shapes otherwise."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] \
            or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"q, k, v must be [B, T, H, D], [B, T, K, D], [B, T, K, Dv] with matching B, T (K key/value "
                         f"heads in k and v): {q.shape=}, {k.shape=}, {v.shape=}")
    return kv_group(q.shape[2], k.shape[2], f"k {k.shape} and v {v.shape} (q {q.shape})")


def prepare_inputs(q, k, v, fmap: FeatureMapParams, theta_H, spec: LolcatsSpec, lay: KernelLayout):
    """(q, k, v) zero-padded to Tp = N·C in q's dtype (k, v keep their K heads), and the per-query-head scalars
    hs_H4 = [γ, λ, b_q, b_k] (f32)."""
    H = q.shape[2]
    if spec.form == "hybrid":
        if theta_H is None or theta_H.shape != (H,):
            raise ValueError(f"form='hybrid' needs theta_H of shape (H,)=({H},), got "
                             f"{None if theta_H is None else theta_H.shape}")
        gamma_H, lam_H = window_factors(theta_H, spec, jnp.float32)
    else:
        gamma_H, lam_H = jnp.zeros((H,), jnp.float32), jnp.ones((H,), jnp.float32)
    zeros_H = jnp.zeros((H,), jnp.float32)
    bq_H = zeros_H if fmap.bq is None else fmap.bq.astype(jnp.float32)
    bk_H = zeros_H if fmap.bk is None else fmap.bk.astype(jnp.float32)
    hs_H4 = jnp.stack([gamma_H, lam_H, bq_H, bk_H], axis=-1)
    pad = lay.num_chunks * lay.chunk - q.shape[1]
    qp, kp, vp = (jnp.pad(x.astype(q.dtype), ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    return qp, kp, vp, hs_H4


def _softmax_teacher(q, k, v):
    """The softmax form (causal, 1/√D), via XLA / cuDNN: no LoLCATS kernel is needed for it (k, v with K heads:
    dot_product_attention takes grouped-query inputs as they are)."""
    dtype = jnp.promote_types(q.dtype, jnp.float32) if jax.default_backend() != "gpu" else q.dtype
    y = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), is_causal=True)
    return y.astype(q.dtype)

