"""Backend.PALLAS entry module: `kernels.lolcats.api.resolve_backend` imports it on demand; importing it registers
the fused Pallas kernels of pallas_hybrid.py (see there for the notation and the math), launched with the parameters
tuned for the call's shape on this device kind where `kernels.lolcats.autotune` measured them, else the defaults."""

from kernels.lolcats.api import register_backend
from kernels.lolcats.autotune import config_for
from kernels.lolcats.pallas_hybrid import PallasConfig, pallas_lolcats_attention, unsupported_reason
from kernels.lolcats.spec import Backend


def lolcats_attention_pallas(q, k, v, fmap, theta_H, spec):
    """Backend function `fn(q, k, v, fmap, theta_H, spec) -> y` registered as Backend.PALLAS (under shard_map the
    shapes are the shard's, and so is the tuning key)."""
    config = config_for(spec, q.shape, k.shape, v.shape, fmap.wq.shape[-1], q.dtype)
    return pallas_lolcats_attention(q, k, v, fmap, theta_H, spec, config)


register_backend(Backend.PALLAS, lolcats_attention_pallas, unsupported=unsupported_reason)

__all__ = ["PallasConfig", "lolcats_attention_pallas", "pallas_lolcats_attention"]
