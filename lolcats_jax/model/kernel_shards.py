"""Opaque attention kernels (Pallas / Triton custom calls) run once per shard, under `shard_map`.

XLA cannot partition a custom call: left to the partitioner, every device would gather q, k, v and compute the
attention of the whole batch and all heads (8× the work on an fsdp-8 mesh, 32× on tensor 8 × fsdp 4). LoLCATS
attention is independent across batch rows and heads, so each device runs the kernel on its own rows (batch over
`data` + `fsdp`) and heads (`tensor`) — the logical axes "batch" and "act_heads" of the one rules table — with the
feature maps and window logits of those heads. A dimension the mesh does not divide stays whole (as everywhere in
`lolcats_jax.sharding`): still correct, only redundant along that mesh axis.

Key/value heads (logical axis "act_kv_heads") are split over the same mesh axes as the query heads, so each device
holds the K/|tensor| kv heads its H/|tensor| query heads read (query head h reads kv head h // (H/K) before and
after the split). Only when the mesh divides H but not K (e.g. K = 2 over tensor 4) are k and v repeated to H heads
first — correct, at the cost of the copies that grouped heads otherwise avoid.

Notation: B batch, T tokens, H query heads, K key/value heads, D head dim, Dv value dim, F feature dim.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from kernels.lolcats import Backend, FeatureMapParams
from kernels.lolcats.reference import repeat_kv_heads
from lolcats_jax import compat
from lolcats_jax.sharding import logical_to_spec

_log = logging.getLogger(__name__)
OPAQUE_BACKENDS = frozenset({Backend.PALLAS, Backend.TRITON})


def per_shard(fn: Callable, q_BTHD, k_BTKD, v_BTKD, fmap: FeatureMapParams, theta_H):
    """fn(q, k, v, fmap, theta) on each device's rows and heads of the current mesh (plain call off a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return fn(q_BTHD, k_BTKD, v_BTKD, fmap, theta_H)
    x = logical_to_spec(("batch", None, "act_heads", None), mesh, q_BTHD.shape)
    kv = logical_to_spec(("batch", None, "act_kv_heads", None), mesh, k_BTKD.shape)
    heads = x[2]
    if kv[2] != heads:  # the mesh splits the query heads but cannot split the kv heads the same way
        _log.warning("kernel per shard: %s kv heads cannot follow %s query heads over mesh axes %s; repeating k and "
                     "v to %d heads", k_BTKD.shape[2], q_BTHD.shape[2], heads, q_BTHD.shape[2])
        H = q_BTHD.shape[2]
        k_BTKD, v_BTKD = repeat_kv_heads(k_BTKD, H), repeat_kv_heads(v_BTKD, H)
        kv = x
    w_HDF, s_H = P(heads, None, None), P(heads)
    fmap_specs = FeatureMapParams(w_HDF, w_HDF, None if fmap.bq is None else s_H, None if fmap.bk is None else s_H)
    theta_spec = None if theta_H is None else s_H
    sharded = compat.shard_map(fn, mesh=mesh, in_specs=(x, kv, kv, fmap_specs, theta_spec), out_specs=x)
    return sharded(q_BTHD, k_BTKD, v_BTKD, fmap, theta_H)


__all__ = ["OPAQUE_BACKENDS", "per_shard"]
