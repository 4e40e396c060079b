"""Public entry point `lolcats_attention` and the backend registry.

Notation: B batch, T tokens, H query heads, K key/value heads, D head dim (see spec.py). Layout [B, T, ·, D]; q has
H heads, k and v K heads (grouped-query attention: H a multiple of K, query head h reads kv head h // (H/K); every
backend takes them un-repeated), post-RoPE; positions 0..T-1.

Backends are functions `fn(q, k, v, fmap, theta_H, spec) -> y` registered per `Backend`. REFERENCE and CHUNKED are
built in; PALLAS / TRITON are plugged in with `register_backend`, or registered on import by the modules
`kernels.lolcats.pallas` / `kernels.lolcats.triton`, which `resolve_backend` imports on demand when they exist.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
from typing import Callable, Iterable

import jax
from jaxtyping import Array, Float

from kernels.lolcats.spec import Backend, FeatureMapParams, LolcatsSpec, kv_group

AttentionFn = Callable[..., Array]
# (spec, q_shape, v_shape, feature_dim) -> None if the backend runs these shapes, else why not
UnsupportedFn = Callable[[LolcatsSpec, tuple, tuple, int], "str | None"]
_log = logging.getLogger("kernels.lolcats")


@dataclasses.dataclass(frozen=True)
class _Entry:
    fn: AttentionFn
    platforms: tuple[str, ...] | None
    unsupported: UnsupportedFn | None


_REGISTRY: dict[Backend, _Entry] = {}
_FALLBACKS_LOGGED: set[tuple] = set()
_AUTOLOAD_MODULES = {Backend.PALLAS: "kernels.lolcats.pallas", Backend.TRITON: "kernels.lolcats.triton"}


def register_backend(backend: Backend | str, fn: AttentionFn, *, platforms: Iterable[str] | None = None,
                     unsupported: UnsupportedFn | None = None) -> None:
    """Register `fn(q, k, v, fmap, theta_H, spec) -> y` as the implementation of `backend`.

    platforms: the JAX platforms ("cpu", "gpu", "tpu") it can run on; None = any. unsupported: says why the
    backend cannot take given shapes (Backend.AUTO then falls back to CHUNKED). Re-registering replaces.
    """
    backend = Backend(backend)
    if backend is Backend.AUTO:
        raise ValueError("Backend.AUTO is resolved, not registered")
    _REGISTRY[backend] = _Entry(fn, None if platforms is None else tuple(platforms), unsupported)


def registered_backends() -> tuple[Backend, ...]:
    return tuple(_REGISTRY)


def _ensure_loaded(backend: Backend) -> bool:
    if backend in _REGISTRY:
        return True
    if backend is Backend.REFERENCE:
        from kernels.lolcats import reference

        register_backend(Backend.REFERENCE, reference.lolcats_attention_reference)
    elif backend is Backend.CHUNKED:
        from kernels.lolcats import chunked

        register_backend(Backend.CHUNKED, chunked.lolcats_attention_chunked)
    elif backend in _AUTOLOAD_MODULES:
        name = _AUTOLOAD_MODULES[backend]
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:
            found = False
        if found:
            importlib.import_module(name)  # registers itself on import
    return backend in _REGISTRY


def _platform() -> str:
    return jax.default_backend()


def resolve_backend(backend: Backend | str, spec: LolcatsSpec, shapes: tuple[tuple, tuple, int] | None = None) -> Backend:
    """A concrete backend for `spec` on this machine, or a ValueError/RuntimeError that says why not.

    AUTO → REFERENCE for compat tk masks (the only backend that has them); otherwise on GPU → PALLAS if one is
    registered (or importable) and takes `shapes` = (q_shape, v_shape, feature_dim) when given, else CHUNKED (the
    reason logged once per shape); on CPU/TPU → CHUNKED.
    """
    backend = Backend(backend)
    if backend is Backend.AUTO:
        if spec.uses_compat_masks:
            backend = Backend.REFERENCE
        elif _platform() == "gpu" and _ensure_loaded(Backend.PALLAS) and _runs_here(Backend.PALLAS) \
                and _takes(Backend.PALLAS, spec, shapes):
            backend = Backend.PALLAS
        else:
            backend = Backend.CHUNKED
    if spec.uses_compat_masks and backend is not Backend.REFERENCE:
        raise ValueError(f"spec.compat=True with window='tk' (original end-aligned masks) is only implemented by "
                         f"Backend.REFERENCE, not {backend}")
    if not _ensure_loaded(backend):
        raise RuntimeError(f"{backend} has no implementation registered in this process (its module "
                           f"{_AUTOLOAD_MODULES.get(backend)!r} is absent or did not call register_backend)")
    if not _runs_here(backend):
        raise RuntimeError(f"{backend} cannot run on platform {_platform()!r}; it is registered for "
                           f"{_REGISTRY[backend].platforms}")
    return backend


def _runs_here(backend: Backend) -> bool:
    platforms = _REGISTRY[backend].platforms
    return platforms is None or _platform() in platforms


def _takes(backend: Backend, spec: LolcatsSpec, shapes: tuple[tuple, tuple, int] | None) -> bool:
    check = _REGISTRY[backend].unsupported
    if shapes is None or check is None:
        return True
    q_shape, v_shape, feature_dim = shapes
    reason = check(spec, tuple(q_shape), tuple(v_shape), int(feature_dim))
    if reason is None:
        return True
    key = (backend, spec, tuple(q_shape), tuple(v_shape), int(feature_dim))
    if key not in _FALLBACKS_LOGGED:
        _FALLBACKS_LOGGED.add(key)
        _log.warning("Backend.AUTO: %s cannot run q %s, v %s, feature dim %d (%s); using %s", backend.value,
                     tuple(q_shape), tuple(v_shape), feature_dim, reason, Backend.CHUNKED.value)
    return False


def check_inputs(q, k, v, fmap: FeatureMapParams, theta_H, spec: LolcatsSpec) -> None:
    """Raise a ValueError naming the shapes if the inputs do not fit the contract: q [B, T, H, D], k [B, T, K, D],
    v [B, T, K, Dv] with K dividing H."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] \
            or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"q, k, v must be [B, T, H, D], [B, T, K, D], [B, T, K, Dv] (matching B, T; K key/value "
                         f"heads in k and v): {q.shape=}, {k.shape=}, {v.shape=}")
    _, _, H, D = q.shape
    kv_group(H, k.shape[2], f"k {k.shape} and v {v.shape} (q {q.shape})")
    if spec.form != "softmax":
        for name, w in (("wq", fmap.wq), ("wk", fmap.wk)):
            if w.ndim != 3 or w.shape[:2] != (H, D):
                raise ValueError(f"fmap.{name} must be (H, D, F) = ({H}, {D}, F): {w.shape=}")
        if fmap.wq.shape != fmap.wk.shape:
            raise ValueError(f"fmap.wq and fmap.wk differ: {fmap.wq.shape=} {fmap.wk.shape=}")
    if spec.form == "hybrid" and (theta_H is None or theta_H.shape != (H,)):
        raise ValueError(f"form='hybrid' needs theta_H of shape (H,) = ({H},), got "
                         f"{None if theta_H is None else theta_H.shape}")


def lolcats_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K Dv"],
    fmap: FeatureMapParams,
    theta_H: Float[Array, "H"] | None,
    spec: LolcatsSpec,
    backend: Backend | str = Backend.AUTO,
) -> Float[Array, "B T H Dv"]:
    """LoLCATS attention of spec.form, y (B, T, H, Dv) in q's dtype (math in float32, or float64 for float64 inputs).

    k, v have K ≤ H heads (grouped-query attention, query head h reads kv head h // (H/K)); no backend repeats them.

    Differentiable wrt q, k, v, fmap and theta_H. theta_H (per-head window logit, γ = sigmoid(θ)) may be None for
    the linear and softmax forms; fmap is unused by the softmax form.
    """
    check_inputs(q, k, v, fmap, theta_H, spec)
    feature_dim = 0 if spec.form == "softmax" else fmap.wq.shape[-1]
    entry = _REGISTRY[resolve_backend(backend, spec, (q.shape, v.shape, feature_dim))]
    return entry.fn(q, k, v, fmap, theta_H, spec)
