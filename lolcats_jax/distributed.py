"""Multi-process start-up through JAX's own multi-controller runtime (`jax.distributed`).

Launched by SLURM (srun) the coordinator, process count and id are detected by JAX itself; otherwise they come
from the run config (`run.coordinator`, `run.num_processes`, `run.process_id`) or the environment
(`LOLCATS_COORDINATOR`, `LOLCATS_NUM_PROCESSES`, `LOLCATS_PROCESS_ID`). A single process needs nothing.

On CPU, cross-process collectives go through Gloo, and the first collective over a group of devices sets up a Gloo
context with a fixed 30 s limit (XLA's collective-timeout flags do not reach it): if one process reaches that first
collective more than 30 s after the others, say because it loaded a checkpoint more slowly on a loaded machine,
every process fails with "Gloo context initialization failed". Once the context exists, a later collective over the
same devices waits as long as XLA's collective timeout allows. Measured here on jaxlib 0.10.2: 4 processes × 8
devices and 2 × 1, one process 35-150 s late, failed at the first collective and passed at a second one after a
warm-up (benchmarks/results/rehearsals.md). So `maybe_initialize` runs one all-device collective right after start-up,
while the processes are still in step (JAX's start-up exchange has just synchronised them), and the barriers that come
later (Orbax's, the evaluate stage's) find their context already set up.

A collective over a *subset* of the processes (say the two processes of one tensor-parallel pair among four) has a
context of its own, set up when a compiled program first runs it, with the same 30 s limit; a process that compiled
the program more slowly, or restored its checkpoint later, fails the others (reproduced with 4 processes × 1 device,
one 35 s late: "Gloo context initialization failed ... key: cpu:gloo/0,2048/1"). `AlignedJit` wraps the jitted
steps: on a new input signature it compiles ahead of time, then waits at an all-process barrier (whose context is
already open) and only then runs, so every process enters the new program's first collectives together.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Hashable, Sequence

import jax
import numpy as np

from lolcats_jax.config import RunConfig

_initialized = False


def maybe_initialize(run: RunConfig) -> None:
    if _initialized:
        return
    coordinator = run.coordinator or os.environ.get("LOLCATS_COORDINATOR")
    num = run.num_processes or _env_int("LOLCATS_NUM_PROCESSES")
    pid = run.process_id if run.process_id is not None else _env_int("LOLCATS_PROCESS_ID")
    if coordinator or (num and num > 1):
        if not coordinator or num is None or pid is None:
            raise ValueError("multi-process runs need run.coordinator, run.num_processes and run.process_id (or the LOLCATS_* variables)")
        _start(coordinator_address=coordinator, num_processes=num, process_id=pid)
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        _start()  # JAX reads the SLURM environment


def _start(**kwargs) -> None:
    global _initialized
    _cpu_collectives()
    jax.distributed.initialize(**kwargs)
    _initialized = True
    _open_cpu_collectives()


def _cpu_collectives() -> None:
    """Cross-process collectives on CPU devices go through gloo (GPUs/TPUs use their own)."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # pragma: no cover - flag absent in some versions
        pass


def _open_cpu_collectives() -> None:
    """Sets up the all-device Gloo context now, while the processes are in step (see the module docstring)."""
    if jax.default_backend() == "cpu":
        barrier("lolcats_jax: open the CPU collectives at start-up")


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (an all-device collective); nothing with one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class AlignedJit:
    """A jitted function whose first run of each new compilation starts on every process together (see the module
    docstring). With one process it is the jitted function itself. `lower` and the other attributes of the jitted
    function pass through, so AOT users (the benches, compiled memory) see no difference."""

    def __init__(self, jitted: Callable, name: str, static_argnums: Sequence[int] = ()):
        self._jitted, self._name, self._static = jitted, name, frozenset(static_argnums)
        self._compiled: dict[Hashable, Any] = {}

    def __call__(self, *args):
        if jax.process_count() == 1:
            return self._jitted(*args)
        key = tuple(a if i in self._static else _signature(a) for i, a in enumerate(args))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._jitted.lower(*args).compile()
            barrier(f"lolcats_jax: {self._name} compiled (signature {len(self._compiled)})")
            self._compiled[key] = compiled
        return compiled(*(a for i, a in enumerate(args) if i not in self._static))

    def __getattr__(self, attr):
        return getattr(self._jitted, attr)


def _signature(tree) -> Hashable:
    """What selects a compilation: the pytree structure and each leaf's shape, dtype, weak type and sharding."""
    leaves, treedef = jax.tree.flatten(tree)

    def leaf(x):
        if isinstance(x, jax.Array):
            return (x.shape, x.dtype, x.weak_type, x.sharding)
        if isinstance(x, (np.ndarray, np.generic)):
            return (x.shape, x.dtype)
        return (type(x),)  # Python scalars: weakly typed, the value does not select a compilation

    return treedef, tuple(leaf(x) for x in leaves)


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


def is_main_process() -> bool:
    return jax.process_index() == 0
