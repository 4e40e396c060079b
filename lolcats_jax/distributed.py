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
"""

from __future__ import annotations

import os

import jax

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
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lolcats_jax: open the CPU collectives at start-up")


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


def is_main_process() -> bool:
    return jax.process_index() == 0
