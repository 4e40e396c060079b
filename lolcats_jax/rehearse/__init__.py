"""Cluster rehearsals without GPUs: a shipped config shrunk in width only, run as several local processes with fake
CPU devices under `jax.distributed`, killed and resumed, and checked against a one-device run.

    python -m lolcats_jax.rehearse --config configs/llama3_1_405b_blockwise.yaml [--layout 4x8] [--out DIR]
"""
