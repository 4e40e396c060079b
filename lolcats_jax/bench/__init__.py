"""Benchmarks (`python -m lolcats_jax.bench <subcommand>`): `attention` (attention.py)."""
