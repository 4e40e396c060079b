"""Mixture-of-experts MLP (Mixtral): router, top-k routing and the SwiGLU experts, split over the `expert` mesh axis.

Notation: B batch, T tokens, E hidden, M MLP hidden (per expert), X experts, K experts per token, N = B·T token rows,
R LoRA rank.

Semantics (transformers' `MixtralSparseMoeBlock`): logits = h · router in the compute dtype; p = softmax(logits) in
float32; the top K of p are kept and renormalised to sum to 1; y = Σ_k w_k · down(silu(gate h) ⊙ up h) over the
chosen experts. The router is a frozen base weight (never a LoRA target, so it is frozen in attention transfer and
in LoRA finetuning); LoRA targets gate / up / down adapt every expert with its own (A, B).

Dispatch is exact, with no capacity and no dropped tokens: the N·K (token, choice) pairs are sorted by expert, each
expert's pairs form one group of a grouped matmul (`jax.lax.ragged_dot`, a real grouped GEMM on GPU/TPU), and the
weighted results are scattered back onto their tokens (float32 accumulation). Each pair costs one expert's FLOPs.

Sharding (under a mesh, in `shard_map`): every device holds X / |expert| experts (its slice of the "expert" axis)
and its slice of M over "tensor"; the fsdp shards of the expert weights are gathered at the boundary, like every
FSDP weight. Token rows are split over ("data", "fsdp", "expert") as everywhere (the `batch` rule), so a device
first all-gathers the rows of its expert group, computes its experts' share of all of them, and the partial sums
are added over "tensor" and reduce-scattered over "expert" back to the rows' owners — the same traffic as a
sequence-parallel tensor-parallel MLP, and no token is computed by more than one device per expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lolcats_jax import compat
from lolcats_jax.sharding import logical_to_spec

EXPERT_TARGETS = ("gate", "up", "down")


def route(h_BTE: jax.Array, router_EX: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(weights (B,T,K) float32, expert indices (B,T,K) int32) of the top-k routing, renormalised."""
    logits = jnp.einsum("bte,ex->btx", h_BTE, router_EX.astype(h_BTE.dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    w, idx = jax.lax.top_k(probs, k)
    return w / jnp.sum(w, axis=-1, keepdims=True), idx.astype(jnp.int32)


def _grouped(x, w, sizes):
    return jax.lax.ragged_dot(x, w.astype(x.dtype), sizes)


def experts_local(h_NE, idx_NK, w_NK, weights: dict, first_expert, *, lora_scale: float = 0.0) -> jax.Array:
    """Σ over the pairs routed to the local experts [first_expert, first_expert + X_local) of w · expert(h), as
    (N, E) float32. `weights`: w_gate/w_up (X_local, E, M), w_down (X_local, M, E), and optional lora_<t>_a/_b.
    With M split over devices, the result is this device's partial sum over its M slice (the down adapter's too:
    (act_m A_m) B summed over the slices m is (act A) B)."""
    N, K = idx_NK.shape
    X = weights["w_gate"].shape[0]
    local = idx_NK.reshape(-1) - first_expert
    mine = (local >= 0) & (local < X)
    key = jnp.where(mine, local, X)  # other devices' pairs sort after the local groups and are never computed
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=X + 1)[:X].astype(jnp.int32)
    token = order // K
    xs = h_NE[token]  # (N·K, E): rows grouped by expert

    def proj(x, name, target):
        y = _grouped(x, weights[name], sizes)
        if f"lora_{target}_a" in weights:
            delta = _grouped(_grouped(x, weights[f"lora_{target}_a"], sizes), weights[f"lora_{target}_b"], sizes)
            y = y + (lora_scale * delta).astype(y.dtype)
        return y

    act = jax.nn.silu(proj(xs, "w_gate", "gate")) * proj(xs, "w_up", "up")
    out = proj(act, "w_down", "down").astype(jnp.float32)
    keep = mine[order]
    scale = jnp.where(keep, w_NK.reshape(-1)[order], 0.0)
    out = jnp.where(keep[:, None], out * scale[:, None], 0.0)
    return jnp.zeros((N, h_NE.shape[1]), jnp.float32).at[token].add(out)


def _expert_weights(p: dict, lora_targets) -> dict:
    names = ["w_gate", "w_up", "w_down"]
    names += [f"lora_{t}_{ab}" for t in EXPERT_TARGETS if t in lora_targets for ab in ("a", "b")]
    return {n: p[n] for n in names}


def _weight_specs(weights: dict, ex, tp) -> dict:
    """Per-device slices: experts over `ex`, M over `tp` (everything else whole)."""
    m_last = P(ex, None, tp)  # (X, E, M) and (X, R, M)
    m_first = P(ex, tp, None)  # (X, M, E) and (X, M, R)
    specs = {"w_gate": m_last, "w_up": m_last, "w_down": m_first,
             "lora_gate_a": P(ex, None, None), "lora_gate_b": m_last, "lora_up_a": P(ex, None, None), "lora_up_b": m_last,
             "lora_down_a": m_first, "lora_down_b": P(ex, None, None)}
    return {n: specs[n] for n in weights}


def moe_mlp(ctx, p: dict, h_BTE: jax.Array) -> jax.Array:
    """The MoE MLP of one layer on normed hidden states h (B,T,E); output in h's dtype."""
    cfg = ctx.cfg
    B, T, E = h_BTE.shape
    w_BTK, idx_BTK = route(h_BTE, p["router"], cfg.num_experts_per_tok)
    weights = _expert_weights(p, ctx.lora_targets)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        y = experts_local(h_BTE.reshape(B * T, E), idx_BTK.reshape(B * T, -1), w_BTK.reshape(B * T, -1), weights, 0,
                          lora_scale=ctx.lora_scale)
        return y.reshape(B, T, E).astype(h_BTE.dtype)

    X, M = cfg.num_experts, cfg.intermediate_size
    ex = "expert" if mesh.shape.get("expert", 1) > 1 and X % mesh.shape["expert"] == 0 else None
    tp = "tensor" if mesh.shape.get("tensor", 1) > 1 and M % mesh.shape["tensor"] == 0 else None
    rows = logical_to_spec(("batch", None, None), mesh, h_BTE.shape)
    row_axes = rows[0] if isinstance(rows[0], tuple) else (() if rows[0] is None else (rows[0],))
    gather = ex is not None and "expert" in row_axes  # rows are split over the expert group: gather, then scatter back
    reduce_expert = ex is not None and not gather  # rows replicated over the group: each computes its experts' share

    def local(h, idx, w, wts):
        b = h.shape[0]
        if gather:
            h, idx, w = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (h, idx, w))
        n = h.shape[0] * T
        first = jax.lax.axis_index("expert") * wts["w_gate"].shape[0] if ex is not None else 0
        y = experts_local(h.reshape(n, E), idx.reshape(n, -1), w.reshape(n, -1), wts, first, lora_scale=ctx.lora_scale)
        if tp is not None:
            y = jax.lax.psum(y, "tensor")
        y = y.reshape(-1, T, E)
        if gather:
            y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
        elif reduce_expert:
            y = jax.lax.psum(y, "expert")
        assert y.shape[0] == b
        return y.astype(h_BTE.dtype)

    sharded = compat.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, _weight_specs(weights, ex, tp)),
                               out_specs=rows)
    return sharded(h_BTE, idx_BTK, w_BTK, weights)


__all__ = ["EXPERT_TARGETS", "experts_local", "moe_mlp", "route"]
