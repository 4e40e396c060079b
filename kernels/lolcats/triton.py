"""Backend.TRITON entry module: `kernels.lolcats.api.resolve_backend` imports it on demand; importing it registers
the hand-written Triton forward of triton_hybrid.py for the "gpu" platform (triton / jax_triton are imported only
when the backend is called)."""

from kernels.lolcats.api import register_backend
from kernels.lolcats.spec import Backend
from kernels.lolcats.triton_hybrid import lolcats_attention_triton, triton_lolcats_attention

register_backend(Backend.TRITON, lolcats_attention_triton, platforms=("gpu",))

__all__ = ["lolcats_attention_triton", "triton_lolcats_attention"]
