"""LoLCATS attention kernels: pure-JAX reference, chunked linear-time (custom VJP) and recurrent decoding.

Layout [B, T, heads, D] everywhere: q with H query heads, k and v with K key/value heads dividing H (grouped-query
attention, never repeated), post-RoPE. See spec.py for the notation and the exact math.
"""

from kernels.lolcats.api import check_inputs, lolcats_attention, register_backend, registered_backends, resolve_backend
from kernels.lolcats.chunked import lolcats_attention_chunked
from kernels.lolcats.feature_maps import (
    DEFAULT_WINDOW_LOGIT,
    compute_dtype,
    feature_map,
    init_feature_maps,
    init_window_logit,
    query_key_features,
    window_factors,
)
from kernels.lolcats.recurrent import (
    DecodeState,
    decode_step,
    decode_tokens,
    init_decode_state,
    prefill_state,
    ring_len,
    select_rows,
)
from kernels.lolcats.reference import attention_weights_reference, lolcats_attention_reference
from kernels.lolcats.spec import (
    LINEAR_DENOM_EPS,
    Backend,
    FeatureMapParams,
    LolcatsSpec,
    key_set_masks,
    key_sets,
)
from kernels.lolcats.xent import attention_xent, attention_xent_reference

__all__ = [
    "Backend", "LolcatsSpec", "FeatureMapParams", "LINEAR_DENOM_EPS", "DEFAULT_WINDOW_LOGIT",
    "key_sets", "key_set_masks", "compute_dtype", "feature_map", "query_key_features", "window_factors",
    "init_feature_maps", "init_window_logit",
    "lolcats_attention", "lolcats_attention_reference", "lolcats_attention_chunked", "attention_weights_reference",
    "DecodeState", "prefill_state", "decode_step", "decode_tokens", "init_decode_state", "ring_len", "select_rows",
    "attention_xent", "attention_xent_reference",
    "register_backend", "registered_backends", "resolve_backend", "check_inputs",
]
