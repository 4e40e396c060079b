"""Multi-process CPU runs: a process that reaches a first collective more than 30 s after the others.

Gloo sets up a context the first time a group of devices runs a collective, with a fixed 30 s limit. The control
groups show that this jaxlib still fails then; the groups using `lolcats_jax.distributed` must get through the same
skew: at start-up (`maybe_initialize` opens the all-device context) and at the first run of a compiled program whose
collectives span a subset of the processes (`AlignedJit`). Control and ours run at once: each test is ~40 s of
sleeping, not of compute.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import portpicker
import pytest

from lolcats_jax.rehearse.launch import child_env

REPO = Path(__file__).resolve().parents[1]
LATE_S = 35  # past Gloo's 30 s context set-up limit

SCRIPT = textwrap.dedent(
    """
    import sys, time
    mode, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import jax
    if mode == "plain":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    else:
        from lolcats_jax.config import RunConfig
        from lolcats_jax.distributed import maybe_initialize
        maybe_initialize(RunConfig(coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=pid))
    from jax.experimental import multihost_utils
    jax.devices()
    if pid == 1:
        time.sleep(float(sys.argv[4]))
    multihost_utils.sync_global_devices("late arrival")
    print(f"process {pid}: collective done", flush=True)
    """
)


# Four processes of one device each in a (2, 2) mesh: the "member" axis pairs processes {0, 1} and {2, 3}, so the
# sum over it is a collective of a two-process group that the start-up warm-up did not open. Process 1 reaches the
# program LATE_S late (as after a slower compile or checkpoint restore).
SUBGROUP_SCRIPT = textwrap.dedent(
    """
    import sys, time
    mode, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lolcats_jax.config import RunConfig
    from lolcats_jax.distributed import AlignedJit, maybe_initialize
    maybe_initialize(RunConfig(coordinator=f"127.0.0.1:{port}", num_processes=4, process_id=pid))
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("pair", "member"))
    x = jax.make_array_from_callback((2, 2), NamedSharding(mesh, P("pair", "member")),
                                     lambda idx: np.full((1, 1), 1.0 + jax.process_index(), np.float32))
    f = jax.jit(lambda a: a.sum(axis=1), out_shardings=NamedSharding(mesh, P("pair")))
    if mode == "ours":
        f = AlignedJit(f, "pair sum")
    if pid == 1:
        time.sleep(float(sys.argv[4]))
    y = f(x)
    got = float(np.asarray(y.addressable_shards[0].data)[0])
    want = 3.0 if pid < 2 else 7.0  # (1 + 2) for processes 0, 1; (3 + 4) for 2, 3
    assert got == want, (got, want)
    print(f"process {pid}: collective done", flush=True)
    """
)


def _group(mode: str, tmp_path: Path, script_text: str = SCRIPT, n: int = 2) -> list[subprocess.Popen]:
    """n processes; process 1 reaches the collective LATE_S late. Output: tmp_path/p<i>.log."""
    script = tmp_path / "late_collective.py"
    script.write_text(script_text)
    port = portpicker.pick_unused_port()
    env = dict(child_env(1), PYTHONPATH=str(REPO))  # the script runs from tmp_path, not as a module of the repo
    procs = []
    for i in range(n):
        with open(tmp_path / f"p{i}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(script), mode, str(port), str(i), str(LATE_S)], cwd=REPO,
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait_for(log: Path, text: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = log.read_text(errors="replace")
        if text in out:
            return out
        time.sleep(1)
    return log.read_text(errors="replace")


def _control_fails_ours_passes(tmp_path: Path, script: str, n: int, ours_is: str, control_gone: str) -> None:
    """Runs the control group and ours at once; ours must finish, the control's process 0 must hit Gloo's limit."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "ours").mkdir()
    control = _group("plain", tmp_path / "plain", script, n)
    ours = _group("ours", tmp_path / "ours", script, n)
    try:
        for i, p in enumerate(ours):
            p.wait(timeout=180)
            out = (tmp_path / "ours" / f"p{i}.log").read_text(errors="replace")
            assert p.returncode == 0, f"process {i} ({ours_is}) failed:\n{out[-3000:]}"
            assert f"process {i}: collective done" in out
        # The control's early process gives up after 30 s (then waits in JAX's shutdown barrier for its partner, which
        # hangs in Gloo's connect for minutes): its log is what is checked, and all are killed.
        early = _wait_for(tmp_path / "plain" / "p0.log", "Gloo context initialization failed", 60)
        assert "Gloo context initialization failed" in early, f"{control_gone}\n{early[-3000:]}"
    finally:
        for p in control + ours:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_process_late_to_its_first_collective_does_not_kill_the_job(tmp_path):
    _control_fails_ours_passes(
        tmp_path, SCRIPT, 2, "started by maybe_initialize",
        "plain jax.distributed now survives a late first collective: this jaxlib no longer needs the start-up "
        "warm-up in lolcats_jax/distributed.py")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_process_late_to_a_new_subgroup_collective_does_not_kill_the_job(tmp_path):
    _control_fails_ours_passes(
        tmp_path, SUBGROUP_SCRIPT, 4, "running an AlignedJit program",
        "a plain jitted program now survives a partner 35 s late to a new subgroup's first collective: this jaxlib "
        "no longer needs AlignedJit's barrier in lolcats_jax/distributed.py")
