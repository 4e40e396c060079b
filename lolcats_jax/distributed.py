"""Multi-process start-up through JAX's own multi-controller runtime (`jax.distributed`).

Launched by SLURM (srun) the coordinator, process count and id are detected by JAX itself; otherwise they come
from the run config (`run.coordinator`, `run.num_processes`, `run.process_id`) or the environment
(`LOLCATS_COORDINATOR`, `LOLCATS_NUM_PROCESSES`, `LOLCATS_PROCESS_ID`). A single process needs nothing.
"""

from __future__ import annotations

import os

import jax

from lolcats_jax.config import RunConfig

_initialized = False


def maybe_initialize(run: RunConfig) -> None:
    global _initialized
    if _initialized:
        return
    coordinator = run.coordinator or os.environ.get("LOLCATS_COORDINATOR")
    num = run.num_processes or _env_int("LOLCATS_NUM_PROCESSES")
    pid = run.process_id if run.process_id is not None else _env_int("LOLCATS_PROCESS_ID")
    if coordinator or (num and num > 1):
        if not coordinator or num is None or pid is None:
            raise ValueError("multi-process runs need run.coordinator, run.num_processes and run.process_id (or the LOLCATS_* variables)")
        _cpu_collectives()
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
        _initialized = True
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        _cpu_collectives()
        jax.distributed.initialize()  # JAX reads the SLURM environment
        _initialized = True


def _cpu_collectives() -> None:
    """Cross-process collectives on CPU devices go through gloo (GPUs/TPUs use their own)."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # pragma: no cover - flag absent in some versions
        pass


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


def is_main_process() -> bool:
    return jax.process_index() == 0
