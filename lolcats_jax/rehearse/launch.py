"""Local "cluster" jobs: P processes of `python -m lolcats_jax.train` under `jax.distributed` on 127.0.0.1, each
with D fake CPU devices, and the kill of one of them at a chosen moment (the others are then killed too, as a
scheduler ends a job step whose task died)."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STAGE_LINE = re.compile(r"\[run\] stage '([a-z_]+)' (starting|finished)")


@dataclasses.dataclass(frozen=True)
class Job:
    """One launch of the trainer: `args` after `--config`, on `processes` × `devices` CPU devices."""

    name: str
    args: tuple[str, ...]
    stages: tuple[str, ...]
    processes: int = 1
    devices: int = 1


@dataclasses.dataclass(frozen=True)
class Kill:
    """SIGKILL process `process` of the job running `stage`, `delay_s` after that process started the stage."""

    stage: str
    process: int
    delay_s: float


@dataclasses.dataclass
class Running:
    job: Job
    procs: list[subprocess.Popen]
    logs: list[Path]
    started: float
    timed_out: bool = False  # killed by `wait` at its deadline


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def start(job: Job, config: Path, log_dir: Path, attempt: int) -> Running:
    log_dir.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "lolcats_jax.train", "--config", str(config), *job.args]
    port = _free_port() if job.processes > 1 else None
    procs, logs = [], []
    for i in range(job.processes):
        cmd = list(base)
        if port is not None:
            cmd += [f"run.coordinator=127.0.0.1:{port}", f"run.num_processes={job.processes}", f"run.process_id={i}"]
        log = log_dir / f"{job.name}.attempt{attempt}.p{i}.log"
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(job.devices)))
        logs.append(log)
    return Running(job, procs, logs, time.perf_counter())


def wait(run: Running, timeout_s: float) -> list[int]:
    """Exit codes of every process; kills the job at `timeout_s` (then the codes are negative)."""
    deadline = time.perf_counter() + timeout_s
    while any(p.poll() is None for p in run.procs):
        if time.perf_counter() > deadline:
            run.timed_out = True
            kill_all(run)
            break
        if any(p.returncode not in (None, 0) for p in run.procs):  # one died: the others would wait forever
            time.sleep(2.0)
            kill_all(run)
            break
        time.sleep(0.1)
    return [p.wait() for p in run.procs]


def kill_all(run: Running) -> None:
    for p in run.procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in run.procs:
        p.wait()


def stage_events(log: Path) -> list[tuple[str, str]]:
    """[(stage, "starting" | "finished")] in the order the process printed them."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return STAGE_LINE.findall(text)


def last_line(log: Path) -> str:
    try:
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def run_with_kill(run: Running, kill: Kill, timeout_s: float) -> dict:
    """Waits for process `kill.process` to start `kill.stage`, SIGKILLs it `kill.delay_s` later (or when it exits
    first), then the rest of the job. Returns where the kill landed."""
    target, log = run.procs[kill.process], run.logs[kill.process]
    deadline = time.perf_counter() + timeout_s
    t_stage = None
    while t_stage is None:
        if (kill.stage, "starting") in stage_events(log):
            t_stage = time.perf_counter()
        elif target.poll() is not None or time.perf_counter() > deadline:
            break
        else:
            time.sleep(0.02)
    if t_stage is None:
        kill_all(run)
        return {"landed": "never: the process ended before the stage started", "exit_codes": [p.returncode for p in run.procs]}
    while time.perf_counter() < t_stage + kill.delay_s and target.poll() is None:
        time.sleep(0.01)
    alive = target.poll() is None
    if alive:
        target.send_signal(signal.SIGKILL)
        target.wait()
    killed_after = time.perf_counter() - t_stage
    kill_all(run)
    events = stage_events(log)
    finished = (kill.stage, "finished") in events
    current = events[-1][0] if events else None
    return {
        "stage": kill.stage, "process": kill.process, "planned_delay_s": round(kill.delay_s, 2),
        "killed_after_s": round(killed_after, 2), "target_was_running": alive,
        "landed": (f"inside '{kill.stage}'" if not finished else f"after '{kill.stage}' finished (in '{current}')") if alive
        else "the process had already exited",
        "last_log_line": last_line(log),
    }


def rerun_summary(log: Path) -> str:
    """What the re-submitted job did first: the stages it skipped as finished, and whether the killed stage
    resumed from a checkpoint or started again (it had none yet)."""
    text = log.read_text(errors="replace")
    skipped = re.findall(r"\[run\] stage '([a-z_]+)' already finished", text)
    resumed = re.findall(r"\[([a-z_0-9]+)\] resuming from step (\d+)", text)
    parts = [f"skipped finished {skipped}"] if skipped else []
    parts += [f"{name} resumed from step {step}" for name, step in resumed] or ["the interrupted stage started again (no checkpoint of it yet)"]
    return "; ".join(parts)

