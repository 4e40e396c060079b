"""What XLA says a training stage needs per device: the stage's real train step, built from abstract shapes (no
weights), lowered and compiled for the config's mesh on fake CPU devices, and its `memory_analysis()`.

The CPU compiler's buffer assignment stands in for the GPU's: the same program, partitioned the same way, but
fused and scheduled by another backend (no cuDNN attention, other fusion decisions), so the figure is a measured
upper-bound-ish companion of the analytic plan rather than a promise about the GPU.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
from flax import nnx

from lolcats_jax import compat
from lolcats_jax.config import Config
from lolcats_jax.model.build import abstract_model, model_options
from lolcats_jax.model.llama import FeatureMapParam, LoraParam, WindowParam
from lolcats_jax.model.llama_config import LlamaConfig
from lolcats_jax.sharding import make_mesh


def fake_devices(n: int) -> None:
    """Ask for `n` CPU devices; must run before JAX starts its backends (a no-op if it already has ≥ n)."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass  # backends already started: whatever devices exist are used
    if len(jax.devices("cpu")) < n:
        raise RuntimeError(f"compiled memory needs {n} devices but this process has {len(jax.devices('cpu'))} CPU devices "
                           "(JAX started before the plan could ask for fake CPU devices)")


def stage_step_memory(cfg: Config, lc: LlamaConfig, stage: str, devices: int) -> dict:
    """{"argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes", "compile_s"} per device of the
    `stage` ("distill" or "finetune") train step at the config's shapes on a mesh of `devices` devices."""
    from lolcats_jax.train.losses import distill_loss, finetune_loss_fn
    from lolcats_jax.train.optim import make_optimizer
    from lolcats_jax.train.step import batch_sharding, build_steps, split_model

    mesh = make_mesh(cfg.mesh.shape(), devices=jax.devices("cpu")[:devices])
    sec = cfg.distill if stage == "distill" else cfg.finetune
    lora = cfg.finetune.lora if stage == "finetune" else None
    model = abstract_model(lc, model_options(cfg, lc.num_layers, lora=lora))
    if stage == "distill":
        filt = nnx.Any(FeatureMapParam, WindowParam)
        loss_fn = functools.partial(distill_loss, mse_factor=sec.mse_factor, xent_factor=sec.xent_factor)
    else:
        filt = nnx.Any(LoraParam, FeatureMapParam, WindowParam) if cfg.finetune.lora.train_attention else LoraParam
        loss_fn = finetune_loss_fn(cfg.finetune)
    split = split_model(model, filt)
    tx = make_optimizer(sec.optim)
    _, train, _, _ = build_steps(split, tx, loss_fn, mesh)
    A, B, T = sec.optim.grad_accum, sec.batch_size, sec.data.chunk_size
    tokens = jax.ShapeDtypeStruct((A, B, T), jnp.int32, sharding=batch_sharding(mesh, True, B))
    batch = {"input_ids": tokens, "labels": tokens}
    opt = jax.eval_shape(tx.init, split.trainable)
    t0 = time.perf_counter()
    with compat.set_mesh(mesh):
        lowered = train.lower(split.trainable, opt, split.frozen, batch, jax.ShapeDtypeStruct((), jnp.float32),
                              jax.ShapeDtypeStruct((2,), jnp.uint32))
        compiled = lowered.compile()
    ma = compiled.memory_analysis()
    out = {
        "argument_bytes": int(ma.argument_size_in_bytes), "output_bytes": int(ma.output_size_in_bytes),
        "temp_bytes": int(ma.temp_size_in_bytes), "alias_bytes": int(ma.alias_size_in_bytes),
        "compile_s": round(time.perf_counter() - t0, 1),
    }
    # live at the peak: the inputs, the outputs that do not reuse (donated) inputs, and the scratch buffers
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def describe(m: dict) -> str:
    gib = 1024**3
    return (f"{m['peak_bytes'] / gib:.2f} GiB (arguments {m['argument_bytes'] / gib:.2f}, temporaries {m['temp_bytes'] / gib:.2f}, "
            f"outputs not donated {(m['output_bytes'] - m['alias_bytes']) / gib:.2f}; compiled in {m['compile_s']} s)")

