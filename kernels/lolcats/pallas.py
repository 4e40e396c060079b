"""Backend.PALLAS entry module: `kernels.lolcats.api.resolve_backend` imports it on demand; importing it registers
the fused Pallas kernels of pallas_hybrid.py (see there for the notation and the math)."""

from kernels.lolcats.pallas_hybrid import PallasConfig, lolcats_attention_pallas, pallas_lolcats_attention

__all__ = ["PallasConfig", "lolcats_attention_pallas", "pallas_lolcats_attention"]
