"""XLA flags this project sets for correctness, before JAX creates its CPU backend. Imports nothing heavy.

XLA:CPU miscompiles some YNNPACK *reduce* fusions (jaxlib 0.10.2, 0.11.2 and 0.12.0.1 were checked here): a
fusion that contains a dot with a broadcast (compile-time constant) operand next to a reduction reads
uninitialised memory once the arrays are large enough, so jitted programs return values like 1e30 or -inf
while the same ops run eagerly are right. The smallest case found (`miscompile_probe` below, B ≥ 8):

    jnp.einsum("bhif,bhfd->bhid", fq, jnp.ones((B, 9, 128, 64))) / jnp.sum(P, -1)[..., None]

In this project it hit the chunked LoLCATS attention whenever a sequence fits in one chunk (T ≤ chunk, so XLA
unrolls the one-step scan and the zero initial state becomes a constant operand of the state dots) and the batch
is large (B·H ≳ 64): every short multiple-choice request scored in batches of 8 on SmolLM2 got garbage
log-likelihoods (the batched-scoring defect of the issue tracker). Related upstream reports: jax-ml/jax #39103,
#39257, #40412; the workaround used there is the same flag.

`apply()` appends `--xla_cpu_experimental_ynn_fusion_type=-reduce` to XLA_FLAGS (the other YNN fusions stay on;
on the SmolLM2 forward the flag costs nothing measurable). A value the user already gave for that flag is kept.
`LOLCATS_XLA_CPU_GUARD=0` turns the workaround off (to check whether a new jaxlib still needs it). The flag only
concerns the CPU backend; GPU and TPU programs are unaffected.

Quick compiles (`LOLCATS_XLA_QUICK_COMPILE=1`, set by the test suite for itself and every process it starts): LLVM
compiles XLA:CPU's generated kernels without optimisation (`--xla_backend_optimization_level=0
--xla_llvm_disable_expensive_passes=true`). The HLO passes (fusion, layout, sharding) and the float semantics stay
the same; only the machine code of the fused elementwise kernels is slower (matmuls run in precompiled libraries).
Tiny models in tests spend most of their time compiling, so this shortens them by a fifth to a third
(`benchmarks/results/startup_and_suite_cpu.md`); real runs and benchmarks keep the default. Flags the user already
gave are kept. On GPU the first flag also lowers the optimisation of the PTX XLA emits: leave it off there.
"""

from __future__ import annotations

import logging
import os
import sys

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
GUARD = f"{YNN_FLAG}=-reduce"
DISABLE_ENV = "LOLCATS_XLA_CPU_GUARD"
QUICK_ENV = "LOLCATS_XLA_QUICK_COMPILE"
QUICK_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")

log = logging.getLogger(__name__)


def guard_enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_backend_started() -> bool:
    """Whether JAX already created its backends (then XLA_FLAGS is no longer read). Only looked at when jax is
    already imported; the attribute is internal, so any doubt counts as 'not started'."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge  # internal: there is no public query

        return bool(getattr(xla_bridge, "_backends", None))
    except Exception:  # pragma: no cover - layout of jax internals changed
        return False


def quick_compile_enabled() -> bool:
    return os.environ.get(QUICK_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def _add_quick_flags() -> None:
    flags = os.environ.get("XLA_FLAGS", "").split()
    for flag in QUICK_FLAGS:
        name = flag.split("=")[0]
        if not any(f.split("=")[0] == name for f in flags):
            flags.append(flag)
    os.environ["XLA_FLAGS"] = " ".join(flags)


def apply() -> bool:
    """Add the CPU guard to XLA_FLAGS unless disabled or already decided by the user (and the quick-compile flags
    when LOLCATS_XLA_QUICK_COMPILE asks for them). Returns whether the process's XLA_FLAGS now carry the guard.
    Warns when JAX's backend already started without it."""
    if quick_compile_enabled() and not _cpu_backend_started():
        _add_quick_flags()
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FLAG in flags:
        return GUARD in flags.split()
    if not guard_enabled():
        return False
    if _cpu_backend_started():
        log.warning("JAX's backend was created before lolcats_jax was imported, so the XLA:CPU workaround %s "
                    "cannot take effect in this process; CPU results of batched LoLCATS attention may be wrong. "
                    "Import lolcats_jax first, or set XLA_FLAGS=%s yourself.", GUARD, GUARD)
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {GUARD}".strip()
    return True


def miscompile_probe(batch: int = 8):
    """(jitted, eager) results of the smallest program known to hit the YNN reduce-fusion miscompile; they
    differ by orders of magnitude where the bug is active. Imports jax."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.RandomState(0)
    P = jnp.asarray(rng.rand(batch, 9, 64, 128), jnp.float32)
    fq = jnp.asarray(rng.rand(batch, 9, 64, 128), jnp.float32)

    def f(P, fq):
        return jnp.einsum("bhif,bhfd->bhid", fq, jnp.ones((P.shape[0], 9, 128, 64), P.dtype)) / jnp.sum(P, -1)[..., None]

    return np.asarray(jax.jit(f)(P, fq)), np.asarray(f(P, fq))
