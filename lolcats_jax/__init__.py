"""lolcats_jax: LoLCATS linearization of Llama-family models in JAX/Flax NNX.

Importing the package sets the XLA flags it needs for correct CPU results (see `lolcats_jax.xla_flags`); import it
before running any JAX computation.
"""

from lolcats_jax import xla_flags as _xla_flags

_xla_flags.apply()
