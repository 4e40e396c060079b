"""Per-device memory plan of a config's training stages, without any weights or devices.

    python -m lolcats_jax.plan --config configs/llama3_1_70b.yaml [--devices N] [--memory-gb 80]

The model and optimizer state are built abstractly (`nnx.eval_shape`, `jax.eval_shape`); every parameter's
per-device shard follows the logical-axis rules on an abstract mesh of the configured size. Activations are an
analytic estimate of the stage's train step with per-layer rematerialisation (the layer inputs kept for the
backward pass, plus the peak of one recomputed layer, plus the logits for next-token losses).

Beside it the command prints the compiled figure (`lolcats_jax.compiled_memory`): the stage's real train step
lowered and compiled for the config's mesh on fake CPU devices, and XLA's memory analysis of it. That is the
figure a run must fit (the analytic one explains it); `--analytic-only` skips the compilation.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from lolcats_jax.cli import run_main
from lolcats_jax.config import Config, load_config
from lolcats_jax.errors import UserError
from lolcats_jax.model.build import abstract_model, model_options
from lolcats_jax.model.llama import FeatureMapParam, LoraParam, WindowParam
from lolcats_jax.model.llama_config import LlamaConfig
from lolcats_jax.model.options import to_dtype
from lolcats_jax.sharding import MESH_AXES, logical_to_spec

GB = 1024**3


def _abstract_mesh(shape: tuple[int, ...]):
    return jax.sharding.AbstractMesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def shard_bytes(shape, dtype, axes, mesh) -> int:
    spec = logical_to_spec(axes, mesh, shape)
    n = 1
    for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        div = 1
        for a in (ax if isinstance(ax, tuple) else (ax,)) if ax is not None else ():
            div *= mesh.shape[a]
        n *= math.ceil(dim / div)
    return n * np.dtype(dtype).itemsize


def llama_config_for(cfg: Config) -> LlamaConfig:
    path = Path(cfg.model.path) / "config.json"
    if path.is_file():
        return LlamaConfig.from_hf_dir(cfg.model.path)
    if cfg.model.architecture:
        return _from_json(cfg.model.architecture)
    raise UserError(f"model.path={cfg.model.path} has no config.json and model.architecture is not set")


def _from_json(path: str) -> LlamaConfig:
    import json

    p = Path(path)
    if not p.is_file():
        raise UserError(f"model.architecture: {p} not found")
    return LlamaConfig.from_hf_dict(json.loads(p.read_text()), source=str(p))


def stage_plan(cfg: Config, lc: LlamaConfig, mesh, stage: str) -> dict:
    """Per-device bytes of one training stage."""
    sec = cfg.distill if stage == "distill" else cfg.finetune
    lora = cfg.finetune.lora if stage == "finetune" else None
    opts = model_options(cfg, lc.num_layers, lora=lora)
    model = abstract_model(lc, opts)
    trainable_types = (FeatureMapParam, WindowParam) if stage == "distill" else (LoraParam,)
    if stage == "finetune" and cfg.finetune.lora.train_attention:
        trainable_types = (FeatureMapParam, WindowParam, LoraParam)
    frozen = trainable = 0
    n_frozen = n_train = 0
    for _, var in nnx.to_flat_state(nnx.state(model)):
        v = var.get_value()
        b = shard_bytes(v.shape, v.dtype, var.get_metadata()["axes"], mesh)
        if isinstance(var, trainable_types):
            trainable += b
            n_train += int(np.prod(v.shape))
        else:
            frozen += b
            n_frozen += int(np.prod(v.shape))
    # AdamW: two fp32 moments per trainable value + the fp32 gradient
    optimizer = 2 * trainable
    grads = trainable
    act = activation_bytes(cfg, lc, mesh, stage, sec.batch_size, sec.data.chunk_size)
    total = frozen + trainable + optimizer + grads + act
    return {
        "stage": stage, "params_frozen": n_frozen, "params_trainable": n_train, "frozen_bytes": frozen,
        "trainable_bytes": trainable, "optimizer_bytes": optimizer, "grad_bytes": grads, "activation_bytes": act,
        "total_bytes": total,
    }


def activation_bytes(cfg: Config, lc: LlamaConfig, mesh, stage: str, global_batch: int, T: int) -> int:
    dp = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    tp = mesh.shape["tensor"]
    B = max(1, math.ceil(global_batch / dp))
    cdt = np.dtype(to_dtype(cfg.model.compute_dtype)).itemsize
    E, H, K, D, M, V, L = lc.hidden_size, lc.num_heads, lc.num_kv_heads, lc.head_dim, lc.intermediate_size, lc.vocab_size, lc.num_layers
    Hs, Ks, Ms, Vs = math.ceil(H / tp), math.ceil(K / tp), math.ceil(M / tp), math.ceil(V / tp)
    saved_inputs = L * B * T * E * cdt if cfg.model.remat else 0
    qkv = B * T * (Hs + 2 * Ks + 2 * Hs) * D * cdt  # q, k, v, repeated k/v
    mlp = B * T * 3 * Ms * cdt
    if lc.is_moe:  # rows gathered over the expert group, K (token, expert) rows each, f32 combine and router probs
        Ng, X = B * T * mesh.shape["expert"], lc.num_experts
        mlp = Ng * lc.num_experts_per_tok * (E * cdt + 3 * Ms * cdt + E * 4) + Ng * E * 4 + B * T * X * 4
    teacher_scores = B * Hs * T * T * 4  # the softmax teacher's fp32 score matrix
    feats = B * T * Hs * 2 * (2 * cfg.attention.feature_dim) * 4
    layer_peak = 2 * (qkv + mlp + feats) + teacher_scores  # forward + backward of one layer
    if not cfg.model.remat:
        layer_peak *= L
    logits = 3 * B * T * Vs * 4 if stage == "finetune" else 0  # logits, log-softmax, gradient (fp32)
    return saved_inputs + layer_peak + logits


def plan(cfg: Config, devices: int | None = None, memory_gb: float | None = None, compiled: bool = False) -> dict:
    """The per-device plan; with `compiled`, each stage also carries XLA's figure (`compiled`, needs `devices`
    JAX devices — fake CPU devices are fine)."""
    lc = llama_config_for(cfg)
    n = devices or cfg.mesh.devices or jax.device_count()
    shape = cfg.mesh.shape().resolve(n)
    mesh = _abstract_mesh(shape)
    stages = [s for s in ("distill", "finetune") if s in cfg.run.stages]
    limit = (memory_gb or cfg.mesh.device_memory_gb) * GB
    out = {"model": cfg.model.path, "params": lc.num_params(), "devices": n, "mesh": dict(zip(MESH_AXES, shape)),
           "param_dtype": cfg.model.param_dtype,
           "device_memory_bytes": limit, "stages": [stage_plan(cfg, lc, mesh, s) for s in stages]}
    if compiled:
        from lolcats_jax.compiled_memory import stage_step_memory

        half = cfg.model.param_dtype in ("bfloat16", "float16")
        for s in out["stages"]:
            s["compiled"] = c = stage_step_memory(cfg, lc, s["stage"], n)
            # XLA:CPU has no half-precision matmul: it converts the frozen weights to float32 (a copy a GPU does not
            # make), so on a GPU the step needs about the compiled peak less that copy — never less than the analytic
            c["cpu_weight_copy_bytes"] = 2 * s["frozen_bytes"] if half else 0
            s["must_fit_bytes"] = max(s["total_bytes"], c["peak_bytes"] - c["cpu_weight_copy_bytes"])
    out["fits"] = all(_must_fit(s) <= limit for s in out["stages"])
    try:
        from lolcats_jax.blockwise.plan import blockwise_plan

        if any(s in cfg.run.stages for s in ("collect", "distill_block")):
            out["blockwise"] = blockwise_plan(cfg, lc, None)
    except ImportError:
        pass
    return out


def _must_fit(stage: dict) -> int:
    """The figure a stage must fit: from XLA's compiled peak when it was measured, else the analytic total."""
    return stage.get("must_fit_bytes", stage["total_bytes"])


def format_plan(p: dict) -> str:
    lines = [f"model {p['model']}: {p['params'] / 1e9:.2f}B parameters on {p['devices']} devices, mesh {p['mesh']}",
             "", "| stage | frozen | trainable | optimizer | grads | activations | analytic total / device | compiled (XLA:CPU) / device | must fit | fits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in p["stages"]:
        fits = "yes" if _must_fit(s) <= p["device_memory_bytes"] else "NO"
        comp = f"{s['compiled']['peak_bytes'] / GB:.2f} GiB" if "compiled" in s else "not compiled"
        lines.append(
            f"| {s['stage']} | {s['frozen_bytes'] / GB:.2f} GiB | {s['trainable_bytes'] / GB:.3f} GiB ({s['params_trainable'] / 1e6:.1f}M) | "
            f"{s['optimizer_bytes'] / GB:.3f} GiB | {s['grad_bytes'] / GB:.3f} GiB | {s['activation_bytes'] / GB:.2f} GiB | "
            f"{s['total_bytes'] / GB:.2f} GiB | {comp} | {_must_fit(s) / GB:.2f} GiB | {fits} |"
        )
    lines.append(f"\nper-device budget: {p['device_memory_bytes'] / GB:.0f} GiB")
    if any("compiled" in s for s in p["stages"]):
        from lolcats_jax.compiled_memory import describe

        lines.append("compiled: XLA's buffer assignment of the stage's real train step for this mesh, compiled for fake CPU "
                     "devices (the analytic columns explain where it goes)")
        for s in p["stages"]:
            if "compiled" in s:
                lines.append(f"  {s['stage']}: {describe(s['compiled'])}")
        copies = [s["compiled"]["cpu_weight_copy_bytes"] for s in p["stages"] if "compiled" in s]
        if any(copies):
            lines.append(f"must fit = the compiled peak less XLA:CPU's float32 copy of the {p['param_dtype']} frozen weights "
                         f"(2 × frozen, up to {max(copies) / GB:.2f} GiB per device; CPUs have no {p['param_dtype']} matmul, a GPU "
                         "makes no such copy), and never less than the analytic total")
        else:
            lines.append("must fit = the compiled peak (never less than the analytic total)")
    if "blockwise" in p:
        lines.append(f"block-wise: {p['blockwise']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lolcats_jax.plan", description="Per-device memory plan of a config.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--devices", type=int, default=None, help="device count (default: mesh.devices of the config)")
    ap.add_argument("--memory-gb", type=float, default=None)
    ap.add_argument("--analytic-only", action="store_true", help="skip compiling the train steps (XLA's figure)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    devices = args.devices or cfg.mesh.devices or 1
    if not args.analytic_only:
        from lolcats_jax.compiled_memory import fake_devices

        fake_devices(devices)
    p = plan(cfg, devices, args.memory_gb, compiled=not args.analytic_only)
    print(format_plan(p))
    return 0 if p["fits"] else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
