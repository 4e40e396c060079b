"""Attention kernels. Importing them sets the project's XLA:CPU correctness flags first (`lolcats_jax.xla_flags`)."""

import lolcats_jax  # noqa: F401  (applies the XLA flags before any kernel is compiled)
