"""Inference on trained or converted models: loading a run directory or HF directory onto a mesh (`loading`,
`run_model`) and generation with constant-memory decode states (`generation`). The command lines are
`python -m lolcats_jax.generate` and `python -m lolcats_jax.evaluate`."""
