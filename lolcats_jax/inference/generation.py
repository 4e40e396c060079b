"""Text generation: parallel prefill (whole or in chunks), then one jitted step per token (KV cache for softmax
layers, the O(1) recurrent state for LoLCATS layers), greedy or temperature/top-p sampling, streaming, EOS handling,
and sessions that append turns to a cached conversation.

Notation: B batch, T prompt tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lolcats_jax.model import decode
from lolcats_jax.model.llama import Llama


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    seed: int = 0


def sample_next(logits_BV: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    if temperature <= 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # smallest set of tokens whose mass reaches top_p (the top token always stays)
        cutoff_idx = jnp.sum(cum - probs < top_p, axis=-1) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx[:, None], axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Session:
    """A batch of conversations held in a cache: what `Generator.start` / `extend` / `reply` pass along.

    `logits` (B, V) are each row's next-token logits after its last consumed token; `lengths` the tokens consumed per
    row (host copy); `max_len` the cache's capacity (softmax layers keep that many slots; LoLCATS layers are O(1))."""

    cache: decode.Cache
    logits: jax.Array
    lengths: np.ndarray
    max_len: int


def _bucket(n: int) -> int:
    """Padded length of a call of n new tokens: a power of two ≥ 8 (few compilations for ragged turns)."""
    return max(8, 1 << (max(n, 1) - 1).bit_length())


def _right_padded(rows: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    return tokens, np.array([len(r) for r in rows], np.int32)


class Generator:
    """Compiles prefill, extend and decode once per shape and runs the loop on the host.

    `generate(prompts, n)` is the one-shot call. For long prompts and conversations: `start` (prefill, optionally in
    chunks of `chunk` tokens), `extend` (append tokens, e.g. the next user turn, to every row), `reply` (sample a
    continuation and consume it, so the session can be extended again)."""

    def __init__(self, model: Llama):
        self.graphdef, self.state = nnx.split(model)
        graphdef = self.graphdef

        @functools.partial(jax.jit, static_argnames=("max_len",))
        def _prefill(state, tokens, lengths, max_len):
            return decode.prefill(nnx.merge(graphdef, state), tokens, lengths, max_len)

        @functools.partial(jax.jit, donate_argnums=(1,))
        def _extend(state, cache, tokens, lengths):
            return decode.extend(nnx.merge(graphdef, state), cache, tokens, lengths)

        @functools.partial(jax.jit, donate_argnums=(1,))
        def _step(state, cache, tokens, active=None):
            return decode.decode_step(nnx.merge(graphdef, state), cache, tokens, active)

        self._prefill = _prefill
        self._extend = _extend
        self._step = _step

    # ------------------------------------------------------------------------------------------- sessions

    def start(self, prompts: Sequence[Sequence[int]], max_len: int, *, chunk: int | None = None) -> Session:
        """Prefills every prompt into a cache of `max_len` positions; with `chunk`, the first `chunk` tokens are
        prefilled and the rest appended `chunk` at a time (bounded activation memory for long prompts)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest > max_len:
            raise ValueError(f"a prompt of {longest} tokens does not fit max_len={max_len}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk={chunk} must be >= 1")
        first = longest if chunk is None else min(chunk, longest)
        tokens, lengths = _right_padded([p[:first] for p in prompts], first)
        logits, cache = self._prefill(self.state, jnp.asarray(tokens), jnp.asarray(lengths), max_len)
        session = Session(cache, logits, lengths, max_len)
        for at in range(first, longest, first):
            session = self.extend(session, [p[at:at + first] for p in prompts], _pad_to=first)
        return session

    def extend(self, session: Session, new_tokens: Sequence[Sequence[int]], *, chunk: int | None = None,
               _pad_to: int | None = None) -> Session:
        """Appends new_tokens[b] (may be empty) to row b, `chunk` tokens per call at most (default: all at once)."""
        if len(new_tokens) != len(session.lengths):
            raise ValueError(f"{len(new_tokens)} rows of new tokens for a session of {len(session.lengths)} rows")
        longest = max(len(t) for t in new_tokens)
        if int((session.lengths + [len(t) for t in new_tokens]).max()) > session.max_len:
            raise ValueError(f"the session holds {session.lengths.tolist()} tokens per row; adding "
                             f"{[len(t) for t in new_tokens]} exceeds its max_len={session.max_len}")
        step = longest if chunk is None else chunk
        for at in range(0, longest, max(step, 1)):
            part = [t[at:at + step] for t in new_tokens]
            tokens, lengths = _right_padded(part, _pad_to or _bucket(max(len(p) for p in part)))
            logits, cache = self._extend(self.state, session.cache, jnp.asarray(tokens), jnp.asarray(lengths))
            logits = jnp.where(jnp.asarray(lengths > 0)[:, None], logits, session.logits)
            session = Session(cache, logits, session.lengths + lengths, session.max_len)
        return session

    def reply(self, session: Session, max_new_tokens: int, *, sampling: SamplingConfig = SamplingConfig(),
              eos_ids: Sequence[int] = (), on_token: Callable[[np.ndarray, np.ndarray], None] | None = None,
              ) -> tuple[list[list[int]], Session]:
        """Samples up to max_new_tokens per row (stopping at, and including, an EOS id) and consumes them: the
        returned session has seen each row's reply, ready for `extend` with the next turn."""
        room = session.max_len - int(session.lengths.max())
        if max_new_tokens > room:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the room left in the session ({room} of "
                             f"max_len={session.max_len})")
        out, logits, cache, consumed = self._loop(session.logits, session.cache, max_new_tokens, sampling, eos_ids,
                                                  on_token, consume_last=True)
        return out, Session(cache, logits, session.lengths + consumed, session.max_len)

    # ------------------------------------------------------------------------------------------- one shot

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        sampling: SamplingConfig = SamplingConfig(),
        eos_ids: Sequence[int] = (),
        on_token: Callable[[np.ndarray, np.ndarray], None] | None = None,
        prefill_chunk: int | None = None,
    ) -> list[list[int]]:
        """Returns the generated token ids of each prompt (stopping at, and including, an EOS id)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        session = self.start(prompts, max(len(p) for p in prompts) + max_new_tokens, chunk=prefill_chunk)
        out, *_ = self._loop(session.logits, session.cache, max_new_tokens, sampling, eos_ids, on_token,
                             consume_last=False)
        return out

    def _loop(self, logits, cache, max_new_tokens, sampling, eos_ids, on_token, consume_last: bool):
        """Sample → feed, max_new_tokens times; rows stop advancing once they emitted an EOS id. With consume_last
        the final sampled tokens are fed too (the cache has then seen every returned token)."""
        B = logits.shape[0]
        key = jax.random.key(sampling.seed)
        out: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        consumed = np.zeros(B, np.int32)
        eos = set(int(e) for e in eos_ids)
        for i in range(max_new_tokens):
            key, sub = jax.random.split(key)
            nxt = sample_next(logits, sub, sampling.temperature, sampling.top_p)
            nxt_host = np.asarray(nxt)
            active = ~done
            for b in np.flatnonzero(active):
                out[b].append(int(nxt_host[b]))
                done[b] = int(nxt_host[b]) in eos
            if on_token is not None:
                on_token(nxt_host, active)  # the new token of each row, and which rows were still generating
            last = i == max_new_tokens - 1 or done.all()
            if last and not consume_last:
                break
            # a row that just emitted EOS still consumes it; rows done before this step stay as they are
            feed = None if active.all() else jnp.asarray(active)
            new_logits, cache = self._step(self.state, cache, nxt, feed)
            logits = new_logits if feed is None else jnp.where(feed[:, None], new_logits, logits)
            consumed += active
            if last:
                break
        return out, logits, cache, consumed
