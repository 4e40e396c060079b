"""Log-likelihood of continuations and perplexity of held-out text, batched, length-bucketed and jitted.

A token request (context_ids, continuation_ids) is scored as lm-evaluation-harness scores it: ONE forward over

    input = (context_ids + continuation_ids)[-(max_length + 1):][:-1]

whose last len(continuation_ids) positions predict the continuation; the result is (Σ log p(continuation token),
whether every continuation token is the argmax). Inputs are right-padded (causal attention: padding at the end
never reaches a real position) to a few bucket lengths (powers of two, then multiples of 256), and every batch of a bucket is padded
to that bucket's one shape (rows, requests, scored positions), so a whole benchmark compiles one program per
bucket — shared by every Scorer of a model with the same structure (teacher vs. student: two programs). The rows
a bucket's last batch leaves free are filled with the longest inputs of the next shorter buckets (`fill_batches`):
a bucket whose inputs all fit there needs no program of its own (a few documents per task, or the tail of a
length distribution, cost no compilation — minutes each at 70B–405B), at the price of padding at most one batch
per bucket to a longer length. Requests
whose inputs are identical (MMLU's four one-token answers after one shared prompt) share one row of the forward,
and the choices of one context (ARC, HellaSwag, PIQA, SciQ) share its run: the context is prefilled once and all its
continuations run together on top of its caches, each seeing the context and only itself (`_score_shared`).
Only the scored positions go through the LM head, flattened over the batch's requests, so memory is
O(rows · T · E + P · V), not O(rows · T · V). A request's numbers
never depend on what it is batched with (tests/test_scoring_batches.py holds batch sizes 1, 3, 8, 32 and a mesh
to fp32 tolerance against each other and against transformers).

Exception: LoLCATS layers with the original end-aligned "tk" masks (`attention.compat: true`) make every
position depend on the total length (reference §3.4), so for such models inputs are never padded: rows are
batched only with inputs of exactly the same length (more compilations, the original's numbers).

Under a mesh (passed in, or the current `jax.set_mesh` context) the rows are sharded over ("data", "fsdp", "expert")
like every activation of the model, and the scores come back replicated (readable on every process); otherwise
everything runs on the default device.

Notation: U input rows, T padded input length, P scored positions (of all requests of a batch, flattened), E
hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lolcats_jax import compat
from lolcats_jax.distributed import AlignedJit
from lolcats_jax.eval.encoding import TokenRequest
from lolcats_jax.sharding import logical_to_spec

MIN_INPUT_BUCKET = 32
COARSE_STEP = 256  # input buckets: powers of two up to this, then its multiples (MMLU prompts: 300–2000 tokens)
MIN_SCORED_BUCKET = 16


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """The smallest power of two ≥ max(n, minimum), capped at `maximum`."""
    b = 1 << max(0, math.ceil(math.log2(max(n, minimum, 1))))
    return min(b, maximum) if maximum is not None else b


def fill_batches(buckets: Sequence[Sequence], batch_size: int, fill: bool = True) -> list[list[list]]:
    """Programs, each a list of batches of at most `batch_size` items: `buckets` holds the items of each length
    bucket, longest bucket first. With `fill`, the free rows of the previous program's last batch take the first
    items of the next bucket, and a bucket left empty by that gets no program (its items run padded to the longer
    length); without, one program per non-empty bucket."""
    programs: list[list[list]] = []
    for items in buckets:
        items = list(items)
        if fill and programs:
            last = programs[-1][-1]
            take = max(0, batch_size - len(last))
            last.extend(items[:take])
            items = items[take:]
        if items:
            programs.append([items[s : s + batch_size] for s in range(0, len(items), batch_size)])
    return programs


def input_bucket(n: int, max_length: int) -> int:
    """Padded input length: a power of two (≥ 32) up to 256, then a multiple of 256; never above max_length."""
    b = bucket(n, MIN_INPUT_BUCKET) if n <= COARSE_STEP else -(-n // COARSE_STEP) * COARSE_STEP
    return min(b, max_length)


def length_dependent(model) -> bool:
    """True when padding would change the model's outputs (LoLCATS layers with end-aligned compat tk masks)."""
    if "lolcats" not in tuple(getattr(model, "kinds", ())):
        return False
    return bool(model.opts.lolcats.spec().uses_compat_masks)


def _current_mesh() -> jax.sharding.Mesh | None:
    mesh = jax.sharding.get_mesh()
    return None if mesh is None or mesh.empty else mesh


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Token-level perplexity over non-overlapping windows (the first token of the text is never predicted)."""

    n_tokens: int  # tokens predicted
    n_windows: int
    chunk_len: int
    nll_per_token: float
    ppl: float

    def as_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def _batch_multiple(mesh) -> int:
    """Rows of every batch are a multiple of this: the mesh's batch shards ("data" × "fsdp" × "expert"; 1 without a mesh)."""
    return 1 if mesh is None else math.prod(int(mesh.shape.get(a, 1)) for a in ("data", "fsdp", "expert"))


def _replicated(x: jax.Array) -> jax.Array:
    """`x` replicated on every device of the current mesh (so every process can read it), else unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())


def _logp_greedy(logits_PV, targets_P):
    """(log p(target), target is the argmax) per scored position, replicated."""
    logp_P = jnp.take_along_axis(logits_PV, targets_P[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits_PV, axis=-1)
    return _replicated(logp_P), _replicated(jnp.argmax(logits_PV, axis=-1) == targets_P)


@functools.partial(jax.jit, static_argnums=0)
def _score_positions(graphdef, state, tokens_UT, rows_P, pos_P, targets_P):
    """(log p, is-argmax) of targets_P[p] as the prediction at position pos_P[p] of row rows_P[p], each (P,).
    Module-level and keyed by the graph definition: Scorers of models with the same structure share compilations."""
    net = nnx.merge(graphdef, state)
    U, T = tokens_UT.shape
    positions_UT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (U, T))
    x_UTE, _ = net.run_layers(net.embed_tokens(tokens_UT), positions_UT)
    logits_PV = net.logits(x_UTE[rows_P, pos_P][None])[0]
    return _logp_greedy(logits_PV, targets_P)


@functools.partial(jax.jit, static_argnums=0)
def _score_shared(graphdef, state, ctx_UT, ctx_len_U, tokens_UM, offset_UM, branch_UM, real_UM, row_P, m_P, targets_P):
    """(log p, is-argmax) per scored position when several continuations share a context. The U contexts run once
    (prefill, with their decode caches); then each row's continuations, but their last tokens, packed into M slots
    (token m: the offset_UM-th of branch branch_UM), run at once on top of the row's cache, each seeing only the
    context and its own branch (`decode.branch_hidden`). Scored position p of row row_P[p] is predicted by the hidden
    state after the context (m_P[p] = −1: a continuation's first token) or after packed token m_P[p]. For
    default-mode models this equals one parallel forward over context + continuation (up to fp32 rounding)."""
    from lolcats_jax.model import decode

    net = nnx.merge(graphdef, state)
    x_UTE, cache = decode.prefill_hidden(net, ctx_UT, ctx_len_U, ctx_UT.shape[1])
    x_UME = decode.branch_hidden(net, cache, tokens_UM, offset_UM, branch_UM, real_UM)
    first_PE = x_UTE[row_P, ctx_len_U[row_P] - 1]
    h_PE = jnp.where((m_P < 0)[:, None], first_PE, x_UME[row_P, jnp.maximum(m_P, 0)].astype(first_PE.dtype))
    logits_PV = net.logits(h_PE[None])[0]
    return _logp_greedy(logits_PV, targets_P)


# with several processes, each new batch shape's compilation first runs on every process together (distributed.py)
_score_positions = AlignedJit(_score_positions, "score_positions", static_argnums=(0,))
_score_shared = AlignedJit(_score_shared, "score_shared", static_argnums=(0,))


@dataclasses.dataclass(frozen=True)
class _SharedShape:
    """Padded shape of every shared-context batch of a bucket."""

    contexts: int  # U
    length: int  # T
    packed: int  # M: continuation tokens fed after a context, all its branches packed (a branch's last token is not fed)
    scored: int  # P


@dataclasses.dataclass(frozen=True)
class _BucketShape:
    """The one array shape every batch of a length bucket is padded to (one compilation per bucket)."""

    rows: int  # U
    length: int  # T
    scored: int  # P, scored positions of all requests of a batch, flattened


class Scorer:
    """Holds a model's (graphdef, state); scoring compiles once per bucket shape (shared by Scorers of models with
    the same structure).

    The state is captured at construction: build a new Scorer after changing the model's weights.
    """

    def __init__(self, model, *, max_length: int | None = None, mesh: jax.sharding.Mesh | None = None):
        self.graphdef, self.state = nnx.split(model)
        self.max_length = int(max_length or model.cfg.max_position_embeddings)
        self.mesh = mesh
        self.exact_lengths = length_dependent(model)
        self.compat = "lolcats" in tuple(getattr(model, "kinds", ())) and bool(model.opts.lolcats.compat)

    # ------------------------------------------------------------------------------------------ batches

    def _padded_length(self, n: int) -> int:
        return n if self.exact_lengths else input_bucket(n, self.max_length)

    def _put(self, mesh, array: np.ndarray, axes: tuple[str | None, ...]) -> jax.Array:
        if mesh is None:
            return jnp.asarray(array)
        spec = logical_to_spec(axes, mesh, array.shape)
        return jax.device_put(array, jax.sharding.NamedSharding(mesh, spec))

    def _bucket_shape(self, mesh, batches: list[list[tuple[int, ...]]], by_input, max_rows: int) -> _BucketShape:
        """Rows: a power of two ≤ max_rows (fewer when the bucket holds fewer inputs), then a multiple of the mesh's
        batch axes; scored positions: a power of two (≥ 16) covering the bucket's fullest batch."""
        multiple = _batch_multiple(mesh)
        n_inputs = sum(len(b) for b in batches)
        U = -(-min(max_rows, bucket(n_inputs, 1)) // multiple) * multiple
        T = self._padded_length(len(batches[0][0]))
        most = max(sum(len(cont) for x in b for _, _, cont in by_input[x]) for b in batches)
        return _BucketShape(U, T, -(-bucket(most, MIN_SCORED_BUCKET) // multiple) * multiple)

    def _run_batch(self, mesh, shape: _BucketShape, inputs: list[tuple[int, ...]], reqs: list[tuple[int, int, list[int]]]):
        """inputs: ≤ shape.rows unique input rows; reqs: (row, start, targets). Returns per-request (Σ log p, greedy)."""
        U, T, P = shape.rows, shape.length, shape.scored
        tokens = np.zeros((U, T), np.int32)
        for u, x in enumerate(inputs):
            tokens[u, : len(x)] = x
        rows, pos, targets = np.zeros(P, np.int32), np.zeros(P, np.int32), np.zeros(P, np.int32)
        spans, p = [], 0
        for row, start, tgt in reqs:  # input position start + k predicts tgt[k]
            n = len(tgt)
            rows[p : p + n], pos[p : p + n], targets[p : p + n] = row, np.arange(start, start + n), tgt
            spans.append((p, p + n))
            p += n
        assert len(inputs) <= U and p <= P
        args = (self._put(mesh, tokens, ("batch", "seq")), self._put(mesh, rows, ("batch",)),
                self._put(mesh, pos, ("batch",)), self._put(mesh, targets, ("batch",)))
        logp_P, greedy_P = _score_positions(self.graphdef, self.state, *args)
        logp_P, greedy_P = np.asarray(logp_P, np.float64), np.asarray(greedy_P)
        return [(float(logp_P[a:b].sum()), bool(greedy_P[a:b].all())) for a, b in spans]

    def _group_by_input(self, requests: Sequence[TokenRequest]) -> dict[tuple[int, ...], list[tuple[int, int, list[int]]]]:
        """input row → [(request index, first scored position, continuation ids)], truncated as the harness does."""
        by_input: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
        for i, (ctx, cont) in enumerate(requests):
            cont = list(cont)
            inp = tuple((list(ctx) + cont)[-(self.max_length + 1) :][:-1])
            if not cont or len(cont) > len(inp):
                raise ValueError(
                    f"request {i}: {len(cont)} continuation tokens cannot be scored with {len(inp)} input tokens "
                    f"(max_length {self.max_length}; the continuation needs at least one context token before it)"
                )
            by_input.setdefault(inp, []).append((i, len(inp) - len(cont), cont))
        return by_input

    # ------------------------------------------------------------------------------------ shared contexts

    def _shared_groups(self, requests: Sequence[TokenRequest]) -> dict[tuple[int, ...], list[int]]:
        """context → indices of the requests scored from one run of it: contexts continued by at least two
        requests, one of them longer than one token (one-token continuations of one context already share one
        input row), none truncated, and the context tokens saved, (k − 1)·len(context), at least the packed
        continuation tokens Σ (len − 1) (else the branch call costs more than it saves: PIQA's two long solutions
        after a short goal, benchmarks/results/scoring_speed_cpu.md). Not for models whose LoLCATS layers follow
        the original's compat caches."""
        if self.compat:
            return {}
        by_ctx: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(requests):
            if ctx and cont and len(ctx) + len(cont) - 1 <= self.max_length:
                by_ctx.setdefault(tuple(ctx), []).append(i)
        def worth(c, ix):
            return len(ix) > 1 and max(len(requests[i][1]) for i in ix) > 1 \
                and (len(ix) - 1) * len(c) >= self._packed_len(requests, ix)

        return {c: ix for c, ix in by_ctx.items() if worth(c, ix)}

    @staticmethod
    def _packed_len(requests, ix) -> int:
        return sum(len(requests[i][1]) - 1 for i in ix)

    def _shared_shape(self, mesh, batches: list[list[tuple[int, ...]]], groups, requests) -> _SharedShape:
        multiple = _batch_multiple(mesh)
        up = lambda n, minimum: -(-bucket(n, minimum) // multiple) * multiple  # noqa: E731
        scored = [sum(len(requests[i][1]) for c in b for i in groups[c]) for b in batches]
        M = bucket(max(self._packed_len(requests, groups[c]) for b in batches for c in b), 8)
        return _SharedShape(up(max(len(b) for b in batches), 1), input_bucket(len(batches[0][0]), self.max_length), M,
                            up(max(scored), MIN_SCORED_BUCKET))

    def _run_shared(self, mesh, shape: _SharedShape, contexts, groups, requests) -> dict[int, tuple[float, bool]]:
        U, T, M, P = shape.contexts, shape.length, shape.packed, shape.scored
        ctx = np.zeros((U, T), np.int32)
        ctx_len = np.ones(U, np.int32)  # padding rows: one token, never read
        tokens, offset, branch = np.zeros((U, M), np.int32), np.zeros((U, M), np.int32), np.full((U, M), -1, np.int32)
        real = np.zeros((U, M), bool)
        row, mm, targets = np.zeros(P, np.int32), np.full(P, -1, np.int32), np.zeros(P, np.int32)
        spans, p = [], 0
        for u, c in enumerate(contexts):
            ctx[u, : len(c)], ctx_len[u] = c, len(c)
            m = 0
            for b, i in enumerate(groups[c]):
                tgt = list(requests[i][1])
                n = len(tgt)
                tokens[u, m : m + n - 1], offset[u, m : m + n - 1] = tgt[:-1], np.arange(n - 1)
                branch[u, m : m + n - 1], real[u, m : m + n - 1] = b, True
                row[p : p + n], targets[p : p + n] = u, tgt
                mm[p + 1 : p + n] = np.arange(m, m + n - 1)  # target t ≥ 1 is predicted after packed token m + t − 1
                spans.append((i, p, p + n))
                m, p = m + n - 1, p + n
        assert p <= P
        put = self._put
        args = (put(mesh, ctx, ("batch", "seq")), put(mesh, ctx_len, ("batch",)), put(mesh, tokens, ("batch", "seq")),
                put(mesh, offset, ("batch", "seq")), put(mesh, branch, ("batch", "seq")), put(mesh, real, ("batch", "seq")),
                put(mesh, row, ("batch",)), put(mesh, mm, ("batch",)), put(mesh, targets, ("batch",)))
        logp_P, greedy_P = _score_shared(self.graphdef, self.state, *args)
        logp_P, greedy_P = np.asarray(logp_P, np.float64), np.asarray(greedy_P)
        return {i: (float(logp_P[a:b].sum()), bool(greedy_P[a:b].all())) for i, a, b in spans}

    def _score_shared_contexts(self, mesh, requests, groups, batch_size: int, results: list) -> None:
        """Batches of contexts of one context-length bucket (one program per bucket, as for rows)."""
        def key(c):
            return input_bucket(len(c), self.max_length)

        order = sorted(groups, key=lambda c: (-key(c), -len(c), c))  # longest first: shorter ones fill its rows
        buckets = [list(g) for _, g in itertools.groupby(order, key=key)]
        for batches in fill_batches(buckets, batch_size):
            shape = self._shared_shape(mesh, batches, groups, requests)
            for b in batches:
                for i, res in self._run_shared(mesh, shape, b, groups, requests).items():
                    results[i] = res

    # ------------------------------------------------------------------------------------------ scoring

    def loglikelihoods(self, requests: Sequence[TokenRequest], batch_size: int = 8,
                       share_contexts: bool = True) -> list[tuple[float, bool]]:
        """(Σ log p(continuation | context), is_greedy) for every request, in input order. Every request's numbers
        are those of scoring it alone (up to fp32 summation order), whatever the batch size. With
        `share_contexts`, a context continued several ways (the choices of a multiple-choice document) runs once
        and its continuations run together on top of its cache (`_score_shared`); `batch_size` then counts
        contexts."""
        if batch_size < 1:
            raise ValueError(f"{batch_size=} must be ≥ 1")
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        mesh = self.mesh if self.mesh is not None else _current_mesh()
        enter_mesh = self.mesh is not None and _current_mesh() is None
        groups = self._shared_groups(requests) if share_contexts else {}
        if groups:
            with compat.set_mesh(mesh) if enter_mesh else contextlib.nullcontext():
                self._score_shared_contexts(mesh, requests, groups, batch_size, results)
        shared = {i for ix in groups.values() for i in ix}
        rest = [i for i in range(len(requests)) if i not in shared]
        if rest:
            for i, res in zip(rest, self._score_rows([requests[i] for i in rest], batch_size, mesh, enter_mesh)):
                results[i] = res
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _score_rows(self, requests: Sequence[TokenRequest], batch_size: int, mesh, enter_mesh: bool) -> list:
        """Every request as one row (ctx + cont)[:-1] (identical rows shared), batched by length bucket."""
        by_input = self._group_by_input(requests)
        # longest inputs first (a batch that does not fit in memory fails at once); a bucket's last batch is topped
        # up with shorter inputs (`fill_batches`), except where padding changes the numbers (exact lengths)
        order = sorted(by_input, key=lambda x: (-len(x), x))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        buckets = [list(g) for _, g in itertools.groupby(order, key=lambda x: self._padded_length(len(x)))]
        with compat.set_mesh(mesh) if enter_mesh else contextlib.nullcontext():
            for batches in fill_batches(buckets, batch_size, fill=not self.exact_lengths):
                shape = self._bucket_shape(mesh, batches, by_input, batch_size)
                for inputs in batches:
                    flat = [(u, i, s, cont) for u, x in enumerate(inputs) for i, s, cont in by_input[x]]
                    scored = self._run_batch(mesh, shape, inputs, [(u, s, cont) for u, _, s, cont in flat])
                    for (_, i, _, _), res in zip(flat, scored):
                        results[i] = res
        return results

    # ------------------------------------------------------------------------------------------ perplexity

    def perplexity(self, token_ids: Sequence[int], chunk_len: int = 512, max_tokens: int | None = None,
                   batch_size: int = 8) -> PerplexityResult:
        """Perplexity of `token_ids[:max_tokens]` in non-overlapping windows of `chunk_len` predicted tokens.

        Window w feeds tokens [w·L, (w+1)·L) and predicts tokens [w·L + 1, (w+1)·L + 1): every token but the
        first is predicted exactly once, with the context reset at each window boundary.
        """
        if not 1 <= chunk_len <= self.max_length:
            raise ValueError(f"{chunk_len=} must be in [1, max_length={self.max_length}]")
        ids = list(token_ids)[: max_tokens if max_tokens else None]
        if len(ids) < 2:
            raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
        windows = [ids[s : s + chunk_len + 1] for s in range(0, len(ids) - 1, chunk_len)]
        scored = self.loglikelihoods([(w[:1], w[1:]) for w in windows], batch_size)
        n = sum(len(w) - 1 for w in windows)
        nll = -sum(lp for lp, _ in scored) / n
        return PerplexityResult(n_tokens=n, n_windows=len(windows), chunk_len=chunk_len, nll_per_token=nll, ppl=math.exp(nll))


    def token_logprobs(self, windows: Sequence[Sequence[int]]) -> np.ndarray:
        """log p(window[t + 1] | window[: t + 1]) for every t of every window: (n, L − 1) float64, for n windows of one
        length L ≤ max_length + 1. One window per forward (its rows padded to the mesh's batch multiple), the LM head
        over all L − 1 positions at once: memory O(L · V) (8K tokens × 49K words ≈ 1.6 GB of fp32 logits)."""
        if not windows:
            return np.zeros((0, 0))
        L = len(windows[0])
        if any(len(w) != L for w in windows) or not 2 <= L <= self.max_length + 1:
            raise ValueError(f"token_logprobs needs windows of one length in [2, max_length + 1 = {self.max_length + 1}]"
                             f", got lengths {sorted({len(w) for w in windows})}")
        mesh = self.mesh if self.mesh is not None else _current_mesh()
        enter_mesh = self.mesh is not None and _current_mesh() is None
        multiple = _batch_multiple(mesh)
        T, P = L - 1, -(-(L - 1) // multiple) * multiple
        out = np.zeros((len(windows), T))
        with compat.set_mesh(mesh) if enter_mesh else contextlib.nullcontext():
            for n, w in enumerate(windows):
                tokens = np.zeros((multiple, T), np.int32)
                tokens[0] = w[:-1]
                pos, targets = np.zeros(P, np.int32), np.zeros(P, np.int32)
                pos[:T], targets[:T] = np.arange(T), w[1:]
                args = (self._put(mesh, tokens, ("batch", "seq")), self._put(mesh, np.zeros(P, np.int32), ("batch",)),
                        self._put(mesh, pos, ("batch",)), self._put(mesh, targets, ("batch",)))
                logp_P, _ = _score_positions(self.graphdef, self.state, *args)
                out[n] = np.asarray(logp_P, np.float64)[:T]
        return out


def _scorer(model_or_scorer) -> Scorer:
    return model_or_scorer if isinstance(model_or_scorer, Scorer) else Scorer(model_or_scorer)


def loglikelihoods(model, requests: Sequence[TokenRequest], batch_size: int = 8) -> list[tuple[float, bool]]:
    """(Σ log p(continuation | context), is_greedy) per token request, in input order. `model` is a Llama or a
    Scorer (reuse one Scorer across calls to reuse its compiled shapes)."""
    return _scorer(model).loglikelihoods(requests, batch_size)


def perplexity(model, token_ids: Sequence[int], chunk_len: int = 512, max_tokens: int | None = None,
               batch_size: int = 8) -> PerplexityResult:
    """Token-level perplexity of held-out text; see `Scorer.perplexity`."""
    return _scorer(model).perplexity(token_ids, chunk_len, max_tokens, batch_size)
