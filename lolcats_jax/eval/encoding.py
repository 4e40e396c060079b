"""Text requests → token requests, tokenised the way lm-evaluation-harness does for causal models.

A request is a pair (context, continuation) of strings; its token form is (context_ids, continuation_ids) with

    context_ids = ids(context),   continuation_ids = ids(context + continuation)[len(context_ids):]

i.e. the whole string is encoded once and split where the context's own encoding ends (the harness's
`_encode_pair`; the two agree with `ids(context + continuation)` unless a BPE merge crosses the boundary). Trailing whitespace of the context is moved to the front of the continuation first, so that
"Answer: " + "A" is scored as "Answer:" + " A" (byte-level BPE tokenizers attach a space to the next word).
An empty context is replaced by the prefix token (BOS, else EOS), as the harness does.

Special tokens follow the tokenizer's default (`tokenizer(text)`): no BOS for SmolLM2, BOS for tokenizers
that add one (Llama 3), exactly like the harness's `HFLM.tok_encode` without `add_bos_token`.
"""

from __future__ import annotations

from typing import Sequence

TokenRequest = tuple[list[int], list[int]]  # (context ids, continuation ids)


def encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text` (the tokenizer's default special tokens unless `add_special_tokens=False`)."""
    # verbose=False: documents longer than the tokenizer's model_max_length are expected (scored in windows)
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def prefix_token_id(tokenizer) -> int:
    """The token that stands in for an empty context: BOS, else EOS (the harness's `prefix_token_id`)."""
    for tok_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on")


class PairEncoder:
    """Encodes (context, continuation) pairs; caches context encodings (choices of one question share them)."""

    def __init__(self, tokenizer, cache_size: int = 4096):
        self.tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}
        self._cache_size = cache_size

    def _encode_cached(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            ids = self._cache[text] = encode(self.tokenizer, text)
        return ids

    def __call__(self, context: str, continuation: str) -> TokenRequest:
        if context == "":
            cont = encode(self.tokenizer, continuation, add_special_tokens=False)
            prefix = prefix_token_id(self.tokenizer)
            if cont and cont[0] == prefix:
                return cont[:1], cont[1:]
            return [prefix], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = encode(self.tokenizer, context + continuation)
        ctx = self._encode_cached(context)
        return list(ctx), whole[len(ctx) :]

    def encode_all(self, pairs: Sequence[tuple[str, str]]) -> list[TokenRequest]:
        """Token requests of all pairs, in order; raises if a continuation encodes to no token."""
        out = []
        for i, (context, continuation) in enumerate(pairs):
            ctx, cont = self(context, continuation)
            if not cont:
                raise ValueError(f"request {i}: the continuation {continuation!r} encodes to no token after context {context[-40:]!r}")
            out.append((ctx, cont))
        return out
