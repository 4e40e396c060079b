"""Rotary position embeddings as transformers computes them for Llama (non-interleaved halves).

Notation: B batch, T tokens, H heads, D head dim.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lolcats_jax.model.llama_config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """inv_freq_j = theta^(-2j/D), j < D/2, with the Llama-3 frequency adjustment when `scaling` is given.

    Computed in float32 numpy, in the same order of operations as transformers, so parity tests see the same
    frequencies."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq
    orig = scaling.original_max_position_embeddings
    low_wavelen = orig / scaling.low_freq_factor
    high_wavelen = orig / scaling.high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    # long wavelengths are divided by `factor`, short ones kept, the band in between interpolated smoothly
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(scaling.factor), inv_freq).astype(np.float32)
    smooth = ((orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(scaling.factor) + smooth * scaled).astype(np.float32)
    is_medium = (~(wavelen < high_wavelen)) & (~(wavelen > low_wavelen))
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions_BT: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape (B, T, D) in float32 for integer positions."""
    freqs_BTd = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb_BTD = jnp.concatenate([freqs_BTd, freqs_BTd], axis=-1)
    return jnp.cos(emb_BTD), jnp.sin(emb_BTD)


def apply_rope(x_BTHD: jnp.ndarray, cos_BTD: jnp.ndarray, sin_BTD: jnp.ndarray) -> jnp.ndarray:
    """x*cos + rotate_half(x)*sin with rotate_half([x1; x2]) = [-x2; x1], computed in float32."""
    dtype = x_BTHD.dtype
    x = x_BTHD.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BTD[:, :, None, :] + rotated * sin_BTD[:, :, None, :]
    return out.astype(dtype)
