"""Cluster rehearsals of the shipped big configs (`python -m lolcats_jax.rehearse`).

* the shrink keeps what shapes the distributed program and shrinks only widths, vocabulary, sequence, steps, data;
* the launch plan follows the configs' documented layouts (block jobs on one device each);
* each shipped config runs as its processes × devices, with one process killed at a random moment and the job
  resumed; its trained parameters equal a one-device run's, its export loads in transformers with the JAX logits,
  and `generate` / `evaluate` run on it with the config's mesh.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lolcats_jax.config import load_config
from lolcats_jax.rehearse import shrink
from lolcats_jax.rehearse.rehearsal import default_layout, job_plan

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ["llama3_1_8b", "llama3_1_70b", "llama3_1_70b_blockwise", "llama3_1_405b", "llama3_1_405b_blockwise"]


def _shrunk(name, tmp_path):
    path = REPO / "configs" / f"{name}.yaml"
    shipped = load_config(path)
    data = {k: str(tmp_path / k) for k in ("text", "alpaca", "heldout")}
    over = shrink.shrink_overrides(shipped, model_dir=str(tmp_path / "model"), data=data, run_dir=str(tmp_path / "run"),
                                   store_dir=str(tmp_path / "store"))
    return shipped, load_config(path, over)


@pytest.mark.parametrize("name", SHIPPED)
def test_shrink_keeps_the_program_shape(name, tmp_path):
    shipped, small = _shrunk(name, tmp_path)
    assert small.mesh == shipped.mesh and small.run.stages == shipped.run.stages
    assert (small.block.size, small.block.index) == (shipped.block.size, shipped.block.index)
    assert small.finetune.lora == shipped.finetune.lora
    for sec in ("distill", "finetune"):
        a, b = getattr(shipped, sec), getattr(small, sec)
        assert (b.batch_size, b.optim.grad_accum, b.epochs, b.data.format) == (a.batch_size, a.optim.grad_accum, a.epochs, a.data.format)
        assert (b.optim.lr, b.optim.schedule, b.optim.weight_decay, b.optim.clip_norm) == (a.optim.lr, a.optim.schedule, a.optim.weight_decay, a.optim.clip_norm)
        assert (b.mse_factor, getattr(b, "xent_factor", None)) == (a.mse_factor, getattr(a, "xent_factor", None)) if sec == "distill" else True
        # how the intervals relate stays as shipped (e.g. "eval not a multiple of checkpoint"), steps past both
        rel = lambda e, c: (e == c, e % c == 0, c % e == 0, e > c)
        assert rel(b.eval_every, b.checkpoint_every) == rel(a.eval_every, a.checkpoint_every)
        assert max(b.eval_every, b.checkpoint_every) <= 3
        steps = b.max_steps if b.epochs is None else None
        if steps is not None:
            assert steps == min(a.max_steps, max(b.eval_every, b.checkpoint_every) + 1)
        assert b.data.chunk_size == shrink.SEQ
    att_a, att_b = shipped.attention, small.attention
    for key in ("kind", "form", "window", "feature_map", "fullspace", "feature_init", "softmax_layers", "compat"):
        assert getattr(att_a, key) == getattr(att_b, key), key
    assert small.model.param_dtype == "float32" and small.evaluate.tasks == shipped.evaluate.tasks


@pytest.mark.parametrize("name", SHIPPED)
def test_shrunk_architecture_keeps_layers_and_heads(name):
    shipped = load_config(REPO / "configs" / f"{name}.yaml")
    arch = json.loads((REPO / shipped.model.architecture).read_text())
    tiny = shrink.shrink_architecture(arch)
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rope_scaling", "rope_theta",
                "tie_word_embeddings", "model_type"):
        assert tiny[key] == arch[key], key
    assert tiny["hidden_size"] % tiny["num_attention_heads"] == 0 and tiny["hidden_size"] < arch["hidden_size"]
    assert tiny["num_attention_heads"] * tiny["head_dim"] <= 512 and tiny["vocab_size"] == shrink.VOCAB


def test_launch_plan_follows_the_documented_layout(tmp_path):
    _, small = _shrunk("llama3_1_405b_blockwise", tmp_path)
    assert default_layout(small) == (4, 8)
    waves = job_plan(small, 4, 8, block_workers=2, num_blocks=14)
    assert [[j.name for j in w] for w in waves] == [["collect"], ["distill_block[0-6]", "distill_block[7-13]"],
                                                     ["stitch+finetune+evaluate"], ["export"]]
    assert waves[0][0].processes == 4 and waves[0][0].devices == 8
    assert all((j.processes, j.devices) == (1, 1) and "mesh.tensor=1" in j.args for j in waves[1])
    assert (waves[3][0].processes, waves[3][0].devices) == (4, 8)  # the config's tensor-8 mesh: one device cannot hold it
    _, joint = _shrunk("llama3_1_70b", tmp_path)
    assert [[j.name for j in w] for w in job_plan(joint, 2, 4, 2, 16)] == [["distill+finetune+evaluate+export"]]


def test_a_job_past_its_time_limit_is_killed_and_named(tmp_path):
    """A job still running at the deadline is killed (every process) and the failure says it was the time limit,
    not a crash: on a loaded machine the cure is `--timeout`, not a bug hunt."""
    from lolcats_jax.rehearse import launch
    from lolcats_jax.rehearse.rehearsal import Rehearsal, RehearsalFailure

    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    run = launch.Running(launch.Job("slow", (), ("distill",), 2, 1), procs, [tmp_path / "p0.log"] * 2, 0.0)
    codes = launch.wait(run, 0.5)
    assert run.timed_out and all(c < 0 for c in codes), codes
    r = Rehearsal(config=tmp_path / "x.yaml", out=tmp_path, processes=2, devices=1, timeout_s=0.5)
    with pytest.raises(RehearsalFailure, match=r"job slow was killed at its time limit of 0.5 s \(--timeout"):
        r._check_codes(run, codes)
    done = launch.Running(launch.Job("crash", (), ("distill",), 1, 1),
                          [subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])], [tmp_path / "p0.log"], 0.0)
    codes = launch.wait(done, 30.0)
    assert not done.timed_out and codes == [3]
    with pytest.raises(RehearsalFailure, match=r"job crash exited \[3\]"):
        r._check_codes(done, codes)


def _rehearse(name, layout, seed, out, layers):
    cmd = [sys.executable, "-m", "lolcats_jax.rehearse", "--config", str(REPO / "configs" / f"{name}.yaml"),
           "--layout", layout, "--seed", str(seed), "--out", str(out), "--layers", str(layers)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3000)
    report_path = out / "report.json"
    assert res.returncode == 0, res.stderr[-4000:] + (report_path.read_text() if report_path.is_file() else "")
    return json.loads(report_path.read_text())


# (config, processes x devices, seed, layers, stage the seed's kill hits): every shipped big config on its cluster's
# device count, with fewer decoder layers (everything else as the shrink keeps it). The seed picks the stage, the
# process and the moment (lolcats_jax.rehearse.rehearsal._choose_kill): 8B finetune; 70B process 1 in distill; 70B
# block-wise a block job; 405B process 3 in export; 405B block-wise process 0 in collect. (Kills in the 4 x 8 jobs'
# training or evaluate stages pass too — e.g. seed 3 finetune, seed 6 evaluate, benchmarks/results/rehearsals.md —
# but re-running those stages on 32 gloo ranks costs CI a minute or two each.) 405B block-wise keeps its 9-layer
# blocks: one block here (the 70B block-wise rehearsal runs two block jobs side by side).
REHEARSALS = [("llama3_1_8b", "1x8", 1, 4, "finetune"), ("llama3_1_70b", "2x4", 6, 2, "distill"),
              ("llama3_1_70b_blockwise", "2x4", 3, 10, "distill_block"), ("llama3_1_405b", "4x8", 0, 2, "export"),
              ("llama3_1_405b_blockwise", "4x8", 2, 9, "collect")]


def test_ci_rehearses_every_shipped_big_config():
    assert sorted(name for name, *_ in REHEARSALS) == sorted(SHIPPED)
    for name, layout, *_ in REHEARSALS:
        p, d = (int(x) for x in layout.split("x"))
        devices = load_config(REPO / "configs" / f"{name}.yaml").mesh.devices
        # the config's device count; the one-GPU 8B recipe as its users also run it: fsdp -1 over an 8-GPU box
        assert p * d == devices or (devices == 1 and name == "llama3_1_8b" and (p, d) == (1, 8)), name


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("name,layout,seed,layers,kill_stage", REHEARSALS)
def test_rehearsal(name, layout, seed, layers, kill_stage, tmp_path):
    """The shipped config as its cluster runs it, with fewer layers: P processes x D fake CPU devices under
    jax.distributed, one process killed at a random moment and the job resumed; trained parameters and logged
    losses against a one-device run, the export in transformers, `generate` / `evaluate` with the config's mesh.
    In the suite (two at a time on 2 cores): ~2-3.5 minutes for the 1 x 8 and 2 x 4 ones, 4-6 for the 4 x 8 ones
    (four processes compiling the same programs, every collective through 32 gloo ranks). The full-depth runs take
    4-20 minutes each: run by hand, figures in benchmarks/results/rehearsals.md."""
    r = _rehearse(name, layout, seed, tmp_path / "r", layers)
    assert r["layers"] == layers
    assert r["passed"] and not r["failures"]
    assert r["kill"]["stage"] == kill_stage and r["kill"]["target_was_running"] and r["kill"]["rerun"]
    trained = {"distill", "finetune"} if "distill" in r["stages"] else {"stitch", "finetune"}
    assert trained <= set(r["params"]) and all("missing" not in p for p in r["params"].values())
    if "distill_block" in r["stages"]:
        size = load_config(REPO / "configs" / f"{name}.yaml").block.size
        assert r["num_blocks"] == -(-layers // size) == sum(k.startswith("distill_block/") for k in r["params"])  # every block
        # block jobs run on one device in both runs, from inputs the 2-process collect wrote: the same bits
        assert all(p["bit_exact"] for k, p in r["params"].items() if k.startswith("distill_block/") or k == "stitch")
    assert r["losses"]["records"] > 0 and r["losses"]["max_rel"] <= 1e-4
    assert r["export"]["max_rel"] <= 1e-4
    assert all(v["exit_code"] == 0 for v in r["inference"].values())
