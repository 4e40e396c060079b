"""Multi-token continuation of a decode state (`extend_state`): chunked prefill and appended turns.

Default mode: prefill + any mix of multi-token calls and single decode steps equals the parallel form over the whole
sequence (float64 reference, per row with its own lengths). Compat: equals an independent float64 numpy
re-implementation of the original's cache (reference §3.3, §3.4, §3.7-3, §3.8), written here from the reference
text: masks built as the original builds them (block diagonal + roll, last rows/columns kept), the state sums of its
`update` / `update_for_decoding`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lolcats_testutil import cast_tree, make_inputs, ref_attention

from kernels.lolcats import LolcatsSpec
from kernels.lolcats.continuation import extend_state
from kernels.lolcats.recurrent import decode_step, prefill_state
from lolcats_jax.compat import enable_x64

# a script of calls: ("prefill", lengths per row), ("extend", new tokens per row, padded to N), ("decode",)
SCRIPT = [("prefill", [6, 3]), ("decode",), ("decode",), ("extend", [5, 2]), ("extend", [3, 3]), ("decode",),
          ("decode",), ("decode",), ("extend", [9, 10]), ("decode",), ("extend", [1, 0]), ("decode",)]


def _run_ours(inputs, spec, script):
    """Outputs per row: {position: y (H, D)} for every token consumed, driving prefill / extend / decode."""
    q, k, v, fmap, theta = inputs
    B = q.shape[0]
    cursor = np.zeros(B, int)
    out = [dict() for _ in range(B)]
    state = None
    extend = jax.jit(extend_state, static_argnums=6)
    step = jax.jit(decode_step, static_argnums=6)

    def take(x, n_B):
        N = max(1, int(max(n_B)))
        rows = [np.pad(np.asarray(x[b, cursor[b]:cursor[b] + n]), ((0, N - n), (0, 0), (0, 0))) for b, n in enumerate(n_B)]
        return jnp.asarray(np.stack(rows), x.dtype)

    for call in script:
        if call[0] == "prefill":
            n_B = call[1]
            xs = [take(x, n_B) for x in (q, k, v)]
            state = prefill_state(xs[1], xs[2], fmap, spec, jnp.asarray(n_B))
            y = ref_attention(*xs, fmap, theta, spec)  # the first call is the parallel form (per row: same length)
        elif call[0] == "extend":
            n_B = call[1]
            xs = [take(x, n_B) for x in (q, k, v)]
            y, state = extend(state, *xs, fmap, theta, spec, jnp.asarray(n_B))
        else:
            n_B = [1] * B
            xs = [take(x, n_B)[:, 0] for x in (q, k, v)]
            y, state = step(state, *xs, fmap, theta, spec)
            y = y[:, None]
        for b, n in enumerate(n_B):
            for i in range(n):
                out[b][cursor[b] + i] = np.asarray(y[b, i], np.float64)
            cursor[b] += n
    return out, cursor


def _lengths(script, B):
    return [sum((c[1][b] if c[0] != "decode" else 1) for c in script) for b in range(B)]


@pytest.mark.parametrize("heads", [(2, 2), (6, 2)], ids=["H2K2", "H6K2"])
@pytest.mark.parametrize("kw", [dict(window="tk", window_size=4), dict(window="sw", window_size=3),
                                dict(window="tk", window_size=3, feature_map="exp_dim", affine=True),
                                dict(form="linear")], ids=["tk4", "sw3", "tk3_exp_affine", "linear"])
def test_continuation_equals_parallel_form(kw, heads):
    """Every consumed position, every row (rows consume different numbers of tokens per call), float64; with
    grouped kv heads (H6K2: 3 query heads per kv head) the state's ring holds the K raw heads."""
    spec = LolcatsSpec(**kw)
    H, K = heads
    with enable_x64():
        T = max(_lengths(SCRIPT, 2))
        inputs = cast_tree(make_inputs(3, 2, T, H, 8, 4, K=K), jnp.float64)
        got, consumed = _run_ours(inputs, spec, SCRIPT)
        want = np.asarray(ref_attention(*inputs, spec), np.float64)
    assert consumed.tolist() == _lengths(SCRIPT, 2)
    for b in range(2):
        for p, y in got[b].items():
            np.testing.assert_allclose(y, want[b, p], rtol=1e-10, atol=1e-12, err_msg=f"row {b} position {p}")


def test_chunked_prefill_float32_is_close():
    """The float32 path (what generation runs) stays close to the parallel form over long chunks."""
    spec = LolcatsSpec(window="tk", window_size=8)
    script = [("prefill", [20, 20])] + [("extend", [16, 16])] * 3 + [("decode",)] * 4
    inputs = make_inputs(5, 2, 72, 2, 8, 4)
    got, _ = _run_ours(inputs, spec, script)
    want = np.asarray(ref_attention(*inputs, spec), np.float64)
    for b in range(2):
        for p, y in got[b].items():
            np.testing.assert_allclose(y, want[b, p], rtol=2e-4, atol=2e-5, err_msg=f"row {b} position {p}")


# ------------------------------------------------------------------------ the original's cache, in numpy


def _orig_masks(spec: LolcatsSpec, L: int):
    """get_masks (tk: block diagonal of W×W ones, plus itself rolled by −W; last rows/cols) or the sw masks."""
    W = spec.window_size
    if spec.window == "sw":
        causal = np.tril(np.ones((L, L)))
        linear = np.tril(np.ones((L, L)), -W)
        return (causal - linear) != 0, linear != 0
    m = math.ceil(L / W)
    M = np.kron(np.eye(m), np.ones((W, W)))
    M = M + np.roll(M, -W, axis=-1)
    M = M[-L:, -L:]
    return np.tril(M) != 0, np.tril(1 - M) != 0


def _np_features(x_LHD, w_HDF, eps):
    u = np.einsum("lhd,hdf->lhf", x_LHD, w_HDF)
    sm = lambda a: np.exp(a - a.max(-1, keepdims=True)) / np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)  # noqa: E731
    return np.maximum(np.concatenate([sm(u), sm(-u)], -1), eps)


class OriginalCache:
    """One row, one layer of LinearAttentionTKWindowCache / the sw cache with the hybrid layer's forward."""

    def __init__(self, spec, fmap, theta):
        self.spec, self.W = spec, spec.window_size
        self.wq, self.wk = (np.asarray(w, np.float64) for w in (fmap.wq, fmap.wk))
        g = 1.0 / (1.0 + np.exp(-np.asarray(theta, np.float64)))
        self.gamma, self.lam = g, (1.0 - g if spec.affine else np.ones_like(g))
        self.kv = None  # kv_states, k_states, decode_kv_states, decode_k_states, k_cache, v_cache

    def call(self, q, k, v):
        """q, k, v (L, H, D) float64 → y (L, H, D)."""
        fq, fk = _np_features(q, self.wq, self.spec.eps), _np_features(k, self.wk, self.spec.eps)
        if len(q) == 1 and self.kv is not None:
            return self._decode(q, k, v, fq)
        win, lin = _orig_masks(self.spec, len(q))
        s = np.einsum("ihd,jhd->hij", q, k) / math.sqrt(q.shape[-1])
        s = np.where(win, s, -1e8)
        a_sm = self.gamma[:, None, None] * np.exp(s - s.max(-1, keepdims=True))
        a_ln = self.lam[:, None, None] * np.where(lin, np.einsum("ihf,jhf->hij", fq, fk), 0.0)
        num = np.einsum("hij,jhd->ihd", a_sm + a_ln, v)
        den = (a_sm + a_ln).sum(-1).T  # (L, H)
        if self.kv is not None:
            S, z = self.kv[0], self.kv[1]
            num = num + self.lam[None, :, None] * np.einsum("ihf,hfd->ihd", fq, S)
            den = den + self.lam[None, :] * np.einsum("ihf,hf->ih", fq, z)
        W = self.W
        dec_S, dec_z = np.einsum("lhf,lhd->hfd", fk[:-W], v[:-W]), fk[:-W].sum(0)
        S, z = dec_S + np.einsum("lhf,lhd->hfd", fk[-W:], v[-W:]), dec_z + fk[-W:].sum(0)
        if self.kv is None:
            self.kv = [S, z, dec_S, dec_z, k[-W:], v[-W:]]
        else:
            self.kv = [self.kv[0] + S, self.kv[1] + z, self.kv[2] + dec_S, self.kv[3] + dec_z, k[-W:], v[-W:]]
        return num / den[..., None]

    def _decode(self, q, k, v, fq):
        S, z, dS, dz, kc, vc = self.kv
        if len(kc) < self.W:
            kc, vc = np.concatenate([kc, k]), np.concatenate([vc, v])
        else:
            fo = _np_features(kc[:1], self.wk, self.spec.eps)
            dS, dz = dS + np.einsum("lhf,lhd->hfd", fo, vc[:1]), dz + fo.sum(0)
            kc, vc = np.concatenate([kc[1:], k]), np.concatenate([vc[1:], v])
        self.kv = [S, z, dS, dz, kc, vc]
        s = np.einsum("hd,nhd->hn", q[0], kc) / math.sqrt(q.shape[-1])
        a = self.gamma[:, None] * np.exp(s - s.max(-1, keepdims=True))
        num = np.einsum("hn,nhd->hd", a, vc) + self.lam[:, None] * np.einsum("hf,hfd->hd", fq[0], dS)
        den = a.sum(-1) + self.lam * np.einsum("hf,hf->h", fq[0], dz)
        return (num / den[:, None])[None]


def _run_original(inputs, spec, script):
    q, k, v, fmap, theta = (np.asarray(x, np.float64) if not hasattr(x, "wq") else x for x in inputs)
    out = []
    for b in range(q.shape[0]):
        cache, cursor, row = OriginalCache(spec, fmap, theta), 0, {}
        for call in script:
            n = 1 if call[0] == "decode" else call[1][b]
            if n == 0:
                continue
            y = cache.call(q[b, cursor:cursor + n], k[b, cursor:cursor + n], v[b, cursor:cursor + n])
            for i in range(n):
                row[cursor + i] = y[i]
            cursor += n
        out.append(row)
    return out


@pytest.mark.parametrize("window", ["tk", "sw"])
def test_compat_continuation_equals_the_original_cache(window):
    """compat: prefill, decode steps, chunks shorter and longer than W and 2W, per-row lengths — each output equals
    the original's stateful / decode branches (including that decoded tokens never reach its call state and that a
    chunk replaces its window cache)."""
    spec = LolcatsSpec(window=window, window_size=4, compat=True)
    # the first call is the parallel form with masks aligned to the end of the longest row: equal prompt lengths
    script = [("prefill", [6, 6])] + SCRIPT[1:]
    with enable_x64():
        T = max(_lengths(script, 2))
        inputs = cast_tree(make_inputs(7, 2, T, 2, 8, 4), jnp.float64)
        got, _ = _run_ours(inputs, spec, script)
        exact, _ = _run_ours(inputs, LolcatsSpec(window=window, window_size=4), script)
    want = _run_original(inputs, spec, script)
    differs = 0.0
    for b in range(2):
        assert sorted(got[b]) == sorted(want[b])
        for p in got[b]:
            np.testing.assert_allclose(got[b][p], want[b][p], rtol=1e-9, atol=1e-11, err_msg=f"row {b} position {p}")
            differs = max(differs, float(np.abs(exact[b][p] - want[b][p]).max()))
    assert differs > 1e-3  # the original's continuation is not the exact form: the test can tell them apart


@pytest.mark.parametrize("spec", [LolcatsSpec(window="tk", window_size=4), LolcatsSpec(window="sw", window_size=3),
                                  LolcatsSpec(form="linear", feature_map="relu")], ids=["tk", "sw", "linear"])
@pytest.mark.parametrize("heads", [(2, 2), (8, 2)], ids=["H2K2", "H8K2"])
def test_branches_continue_one_state_like_the_parallel_form(spec, heads):
    """Several branches packed into one call after one shared prefix (the choices of a question after its context),
    each seeing the prefix and only its own earlier tokens, equal the float64 parallel form over prefix + that
    branch alone, token by token. Row 0: prefix 11 (the state holds linear keys), branches of 5, 1 and 7 tokens; row
    1: prefix 3 (inside the window), branches of 2 and 6; the packed call is padded to 16 slots."""
    from kernels.lolcats.continuation import branch_outputs

    (H, K), D, F, M = heads, 8, 4, 16
    prefixes, branches = [11, 3], [[5, 1, 7], [2, 6]]
    with enable_x64():
        T = max(p + max(b) for p, b in zip(prefixes, branches))
        q, k, v, fmap, theta = make_inputs(3, len(prefixes) * 3, T, H, D, F, dtype=jnp.float64, K=K)
        # sequence (row r, branch j) = row r's prefix (shared: taken from sequence 3r) followed by branch j's tokens
        seq = lambda x, r, j: jnp.concatenate([x[3 * r, : prefixes[r]], x[3 * r + j, prefixes[r]:]], 0)  # noqa: E731
        state = prefill_state(jnp.stack([k[3 * r] for r in range(2)])[:, : max(prefixes)],
                              jnp.stack([v[3 * r] for r in range(2)])[:, : max(prefixes)], fmap, spec,
                              jnp.asarray(prefixes))
        packed = {name: np.zeros((2, M) + x.shape[2:]) for name, x in zip("qkv", (q, k, v))}
        pos, branch, real = np.zeros((2, M), np.int32), np.full((2, M), -1, np.int32), np.zeros((2, M), bool)
        where = []
        for r, (P, lens) in enumerate(zip(prefixes, branches)):
            m = 0
            for j, n in enumerate(lens):
                for name, x in zip("qkv", (q, k, v)):
                    packed[name][r, m : m + n] = np.asarray(seq(x, r, j)[P : P + n])
                pos[r, m : m + n], branch[r, m : m + n], real[r, m : m + n] = np.arange(P, P + n), j, True
                where.append((r, j, m, n))
                m += n
        y = branch_outputs(state, *(jnp.asarray(packed[c]) for c in "qkv"), fmap, theta, spec, jnp.asarray(pos),
                           jnp.asarray(branch), jnp.asarray(real))
        for r, j, m, n in where:
            P = prefixes[r]
            full = [seq(x, r, j)[None, : P + n] for x in (q, k, v)]
            want = np.asarray(ref_attention(*full, fmap, theta, spec))[0, P:]
            np.testing.assert_allclose(np.asarray(y)[r, m : m + n], want, rtol=1e-10, atol=1e-12)
