"""Prefill and token-by-token decoding with per-layer caches.

Softmax layers keep a KV cache of `max_len` slots; LoLCATS layers keep the constant-size recurrent state of
`kernels.lolcats` (linear state S, normaliser z and the window's keys/values), so their memory does not grow with
the generated length.

Batches are RIGHT-padded: row b holds `lengths[b]` real tokens at positions 0..lengths[b]-1 (callers with
left-padded prompts shift them first, see `right_align`). Padded slots are never attended to and never enter a
state. Rows advance together; each has its own position.

Three calls: `prefill` (the prompt, in parallel), `extend` (N more tokens per row on an existing cache, in parallel:
the rest of a long prompt chunk by chunk, or a new conversation turn) and `decode_step` (one token per row; rows
marked inactive stay as they are). For default-mode models any mix of them equals one parallel forward over the
whole sequence; under `attention.compat` the linearized layers follow the original's cache (see
kernels/lolcats/continuation.py).

Notation: B batch, T tokens, S cache slots, E hidden, H heads, K kv heads, D head dim, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lolcats_jax.model import layer as L
from lolcats_jax.model.llama import Llama, segments_of
from lolcats_jax.model.softmax_attention import cached_softmax_attention, causal_softmax_attention


class Cache(NamedTuple):
    segments: tuple  # per segment: {"k","v"} (softmax, stacked over the segment's layers) or a DecodeState (lolcats)
    pos: jax.Array  # (B,) int32: tokens consumed per row (= position of the next token)


def right_align(tokens_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Left-padded (or any-padded with contiguous real tokens) rows → right-padded rows + lengths."""
    lengths = mask_BT.sum(axis=1).astype(jnp.int32)
    first = jnp.argmax(mask_BT, axis=1)
    idx = (jnp.arange(tokens_BT.shape[1])[None, :] + first[:, None]) % tokens_BT.shape[1]
    shifted = jnp.take_along_axis(tokens_BT, idx, axis=1)
    keep = jnp.arange(tokens_BT.shape[1])[None, :] < lengths[:, None]
    return jnp.where(keep, shifted, 0), lengths


def _lolcats_prefill(ctx, p, q, k, v, lengths):
    from kernels.lolcats import prefill_state

    y = L.lolcats_attention_fn(ctx, p, q, k, v)
    state = prefill_state(k, v, L.fmap_params(p), ctx.opts.lolcats.spec(), lengths=lengths)
    return y, state


def prefill(model: Llama, tokens_BT: jax.Array, lengths_B: jax.Array, max_len: int) -> tuple[jax.Array, Cache]:
    """Runs the prompt in parallel; returns the logits (B, V) of each row's last real token and the cache."""
    x, cache = prefill_hidden(model, tokens_BT, lengths_B, max_len)
    last = jnp.take_along_axis(x, (lengths_B - 1)[:, None, None], axis=1)  # (B,1,E)
    return model.logits(last)[:, 0], cache


def prefill_hidden(model: Llama, tokens_BT: jax.Array, lengths_B: jax.Array, max_len: int) -> tuple[jax.Array, Cache]:
    """`prefill` returning the last layer's hidden states (B, T, E) at every position instead of logits."""
    B, T = tokens_BT.shape
    if max_len < T:
        raise ValueError(f"max_len={max_len} must be at least the prompt length T={T}")
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    ctx = model._ctx(positions)
    x = model.embed_tokens(tokens_BT)
    caches = []
    for seg in segments_of(model.kinds):
        params = model._segment_params(seg)

        def body(x_BTE, p, kind=seg.kind):
            q, k, v = L.qkv(ctx, p, x_BTE)
            if kind == "softmax":
                y = causal_softmax_attention(q, k, v)
                pad = ((0, 0), (0, max_len - T), (0, 0), (0, 0))
                c = {"k": jnp.pad(k, pad), "v": jnp.pad(v, pad)}
            else:
                y, c = _lolcats_prefill(ctx, p, q, k, v, lengths_B)
            x_BTE = x_BTE + L.attn_out(ctx, p, y.astype(x_BTE.dtype))
            x_BTE = x_BTE + L.mlp(ctx, p, x_BTE)
            return x_BTE, c

        x, c = jax.lax.scan(body, x, params)
        caches.append(c)
    return x, Cache(tuple(caches), lengths_B.astype(jnp.int32))


def _through_layers(model: Llama, cache: Cache, x, ctx, attend_softmax, attend_lolcats):
    """Runs x through every layer on top of `cache`; attend_*(p, c, q, k, v) → (y, new layer cache or None)."""
    new = []
    for seg, seg_cache in zip(segments_of(model.kinds), cache.segments):
        params = model._segment_params(seg)
        attend = attend_softmax if seg.kind == "softmax" else attend_lolcats

        def body(x_BNE, inputs, attend=attend):
            p, c = inputs
            q, k, v = L.qkv(ctx, p, x_BNE)
            y, c = attend(p, c, q, k, v)
            x_BNE = x_BNE + L.attn_out(ctx, p, y.astype(x_BNE.dtype))
            x_BNE = x_BNE + L.mlp(ctx, p, x_BNE)
            return x_BNE, c

        x, c = jax.lax.scan(body, x, (params, seg_cache))
        new.append(c)
    return x, tuple(new)


def extend(model: Llama, cache: Cache, tokens_BN: jax.Array, lengths_B: jax.Array) -> tuple[jax.Array, Cache]:
    """Consumes the first lengths_b of N new tokens per row (right-padded; 0 leaves a row as it was) on top of the
    cache; returns the logits (B, V) after each row's last new token (unspecified for rows with none) and the cache.
    The caller keeps pos + N within the cache's max_len (softmax layers have that many slots)."""
    x, cache_out = extend_hidden(model, cache, tokens_BN, lengths_B)
    lengths_B = jnp.clip(lengths_B.astype(jnp.int32), 0, tokens_BN.shape[1])
    last = jnp.take_along_axis(x, jnp.maximum(lengths_B - 1, 0)[:, None, None], axis=1)  # (B,1,E)
    return model.logits(last)[:, 0], cache_out


def extend_hidden(model: Llama, cache: Cache, tokens_BN: jax.Array, lengths_B: jax.Array) -> tuple[jax.Array, Cache]:
    """`extend` returning the last layer's hidden states (B, N, E) at every new position instead of logits."""
    from kernels.lolcats.continuation import extend_state

    B, N = tokens_BN.shape
    pos = cache.pos
    lengths_B = jnp.clip(lengths_B.astype(jnp.int32), 0, N)
    positions_BN = pos[:, None] + jnp.arange(N, dtype=jnp.int32)[None, :]
    ctx = model._ctx(positions_BN)
    spec = ctx.opts.lolcats.spec()

    def attend_softmax(p, c, q, k, v):
        S = c["k"].shape[1]
        idx_BS = jnp.arange(S)[None, :] - pos[:, None]  # slot s holds new token s − pos
        here_BS11 = ((idx_BS >= 0) & (idx_BS < lengths_B[:, None]))[:, :, None, None]
        take = lambda x: jnp.take_along_axis(x, jnp.clip(idx_BS, 0, N - 1)[:, :, None, None], axis=1)  # noqa: E731
        kc = jnp.where(here_BS11, take(k).astype(c["k"].dtype), c["k"])
        vc = jnp.where(here_BS11, take(v).astype(c["v"].dtype), c["v"])
        valid_BNS = jnp.arange(S)[None, None, :] <= positions_BN[:, :, None]
        return cached_softmax_attention(q, kc, vc, valid_BNS), {"k": kc, "v": vc}

    def attend_lolcats(p, c, q, k, v):
        return extend_state(c, q, k, v, L.fmap_params(p), p["window_logit"], spec, lengths_B)

    x, segments = _through_layers(model, cache, model.embed_tokens(tokens_BN), ctx, attend_softmax, attend_lolcats)
    return x, Cache(segments, pos + lengths_B)


def branch_hidden(model: Llama, cache: Cache, tokens_BM: jax.Array, offset_BM: jax.Array, branch_BM: jax.Array,
                  real_BM: jax.Array) -> jax.Array:
    """Hidden states (B, M, E) of M tokens per row that continue the row's cache along several branches at once:
    token m is the offset_BM[b, m]-th token of branch branch_BM[b, m] after the cached prefix (position
    cache.pos[b] + offset) and sees the prefix and the earlier real tokens of its own branch — a tree of
    continuations, e.g. every choice of a multiple-choice question after its one context. Equal, per branch, to
    `extend` of that branch alone; the cache is neither copied per branch nor advanced. Default-mode models only."""
    from kernels.lolcats.continuation import branch_outputs

    pos_BM = cache.pos[:, None] + offset_BM.astype(jnp.int32)
    ctx = model._ctx(pos_BM)
    spec = ctx.opts.lolcats.spec()
    own_BMM = (branch_BM[:, :, None] == branch_BM[:, None, :]) & real_BM[:, None, :] \
        & (offset_BM[:, None, :] <= offset_BM[:, :, None])

    def attend_softmax(p, c, q, k, v):
        S = c["k"].shape[1]
        prefix_BMS = jnp.broadcast_to((jnp.arange(S)[None, :] < cache.pos[:, None])[:, None, :], own_BMM.shape[:2] + (S,))
        kc = jnp.concatenate([c["k"], k.astype(c["k"].dtype)], axis=1)
        vc = jnp.concatenate([c["v"], v.astype(c["v"].dtype)], axis=1)
        return cached_softmax_attention(q, kc, vc, jnp.concatenate([prefix_BMS, own_BMM], axis=2)), None

    def attend_lolcats(p, c, q, k, v):
        return branch_outputs(c, q, k, v, L.fmap_params(p), p["window_logit"], spec, pos_BM, branch_BM,
                              real_BM), None

    x, _ = _through_layers(model, cache, model.embed_tokens(tokens_BM), ctx, attend_softmax, attend_lolcats)
    return x  # the cache is read, not advanced: the layers return no new one


def decode_step(model: Llama, cache: Cache, tokens_B: jax.Array,
                active_B: jax.Array | None = None) -> tuple[jax.Array, Cache]:
    """Consumes one token per row; returns logits (B, V) for the next token and the updated cache. Rows with
    active_B False (default: all active) consume nothing: their cache is returned unchanged."""
    from kernels.lolcats import decode_step as lolcats_decode
    from kernels.lolcats import select_rows

    pos = cache.pos
    ctx = model._ctx(pos[:, None])
    spec = ctx.opts.lolcats.spec()

    def attend_softmax(p, c, q, k, v):
        S = c["k"].shape[1]
        here = jnp.arange(S)[None, :] == pos[:, None]
        if active_B is not None:
            here = here & active_B[:, None]
        here = here[:, :, None, None]
        kc = jnp.where(here, k.astype(c["k"].dtype), c["k"])
        vc = jnp.where(here, v.astype(c["v"].dtype), c["v"])
        valid = (jnp.arange(S)[None, :] <= pos[:, None])[:, None, :]
        return cached_softmax_attention(q, kc, vc, valid), {"k": kc, "v": vc}

    def attend_lolcats(p, c, q, k, v):
        y_t, c_new = lolcats_decode(c, q[:, 0], k[:, 0], v[:, 0], L.fmap_params(p), p["window_logit"], spec)
        if active_B is not None:
            c_new = select_rows(active_B, c_new, c)
        return y_t[:, None], c_new

    x, segments = _through_layers(model, cache, model.embed_tokens(tokens_B[:, None]), ctx, attend_softmax,
                                  attend_lolcats)
    step = 1 if active_B is None else active_B.astype(jnp.int32)
    return model.logits(x)[:, 0], Cache(segments, pos + step)


def cache_bytes(cache: Cache) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(cache))


__all__ = ["Cache", "prefill", "prefill_hidden", "extend", "extend_hidden", "branch_hidden", "decode_step", "right_align",
           "cache_bytes"]
