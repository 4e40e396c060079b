"""Text generation: parallel prefill, then one jitted step per token (KV cache for softmax layers, the O(1)
recurrent state for LoLCATS layers), greedy or temperature/top-p sampling, streaming, EOS handling.

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


class Generator:
    """Compiles prefill and decode once per (batch, prompt length, max_len) and runs the loop on the host."""

    def __init__(self, model: Llama):
        self.graphdef, self.state = nnx.split(model)
        graphdef = self.graphdef

        @functools.partial(jax.jit, static_argnames=("max_len",))
        def _prefill(state, tokens, lengths, max_len):
            return decode.prefill(nnx.merge(graphdef, state), tokens, lengths, max_len)

        @functools.partial(jax.jit, donate_argnums=(1,))
        def _step(state, cache, tokens):
            return decode.decode_step(nnx.merge(graphdef, state), cache, tokens)

        self._prefill = _prefill
        self._step = _step

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        sampling: SamplingConfig = SamplingConfig(),
        eos_ids: Sequence[int] = (),
        on_token: Callable[[np.ndarray, np.ndarray], None] | None = None,
    ) -> list[list[int]]:
        """Returns the generated token ids of each prompt (stopping at, and including, an EOS id)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        B, T = len(prompts), max(len(p) for p in prompts)
        tokens = np.zeros((B, T), np.int32)
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = p
        lengths = np.array([len(p) for p in prompts], np.int32)
        max_len = T + max_new_tokens
        logits, cache = self._prefill(self.state, jnp.asarray(tokens), jnp.asarray(lengths), max_len)
        key = jax.random.key(sampling.seed)
        out: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        eos = set(int(e) for e in eos_ids)
        for _ in range(max_new_tokens):
            key, sub = jax.random.split(key)
            nxt = sample_next(logits, sub, sampling.temperature, sampling.top_p)
            nxt_host = np.asarray(nxt)
            active = ~done
            for b in np.flatnonzero(active):
                out[b].append(int(nxt_host[b]))
                done[b] = int(nxt_host[b]) in eos
            if on_token is not None:
                on_token(nxt_host, active)  # the new token of each row, and which rows were still generating
            if done.all():
                break
            logits, cache = self._step(self.state, cache, nxt)
        return out
