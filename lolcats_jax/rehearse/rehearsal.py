"""One rehearsal of a shipped config: shrink it, run it once on one device (the reference) and once laid out as the
cluster runs it, kill one process of one stage at a random moment, resume, and check the results.

How a config's stages are launched (as its comments and docs/slurm_blockwise.md prescribe):

* every stage except `distill_block` runs as one job of P processes × D devices with the config's mesh;
* `distill_block` runs as independent one-device jobs (a SLURM array), `block_workers` of them at once, each
  training a contiguous range of blocks;
* a config without an `export` stage gets one (`--stage export`, P × D with the config's mesh, like the stages
  before it) so that its result can be checked in transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lolcats_jax.config import Config, dump_config, load_config
from lolcats_jax.errors import UserError
from lolcats_jax.fsio import write_json_atomic, write_text_atomic
from lolcats_jax.rehearse import checks, fixtures, launch, shrink

# Cluster layout vs one device, fp32. The layouts add the same numbers in another order (sharded matmuls, batch
# sums across devices), so results agree to rounding — the logged losses, smooth in the weights, to ~1e-5 (held to
# 1e-4). The weights themselves are a coarse check: Adam's first steps move every weight by about ±lr whatever its
# gradient's size, so a weight whose gradient is ~0 turns rounding noise into up to ~lr per step (measured: LoRA
# after 3 steps at lr 1e-4 differed by 5.9e-4 = 0.5% of the largest weight, with every loss equal to 5.6e-6).
# Results trained on one device in both runs (block jobs, stitch) are compared bit for bit in the report.
PARAM_RTOL = 1e-2  # largest parameter difference / largest parameter of the result
LOSS_RTOL = 1e-4  # every logged train / eval loss
EXPORT_RTOL = 1e-4  # transformers' logits vs the JAX model's, relative to the largest logit
TRAINING_STAGES = ("collect", "distill", "distill_block", "stitch", "finetune")
UNTIMED_STAGE_S = 20.0  # kill window of a stage the reference does not run (evaluate, export)


def default_layout(cfg: Config) -> tuple[int, int]:
    """(processes, devices per process) for the config's device count: 8 devices per process (one GPU node)."""
    n = cfg.mesh.devices or 1
    return (n // 8, 8) if n >= 8 and n % 8 == 0 else (1, n)


def job_plan(cfg: Config, processes: int, devices: int, block_workers: int, num_blocks: int) -> list[list[launch.Job]]:
    """Waves of jobs (the jobs of one wave run at the same time)."""
    waves: list[list[launch.Job]] = []
    segment: list[str] = []

    def flush():
        if segment:
            name = "+".join(segment)
            waves.append([launch.Job(name, (f"run.stages=[{','.join(segment)}]",), tuple(segment), processes, devices)])
            segment.clear()

    for stage in cfg.run.stages:
        if stage != "distill_block":
            segment.append(stage)
            continue
        flush()
        workers = max(1, min(block_workers, num_blocks))
        bounds = [num_blocks * w // workers for w in range(workers + 1)]
        waves.append([
            launch.Job(f"distill_block[{lo}-{hi - 1}]",
                       ("--stage", "distill_block", f"block.index={lo}-{hi - 1}", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.expert=1"),
                       ("distill_block",), 1, 1)
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ])
    flush()
    if "export" not in cfg.run.stages:
        # on the cluster layout with the config's mesh, as a user would export a model no single device holds
        waves.append([launch.Job("export", ("--stage", "export"), ("export",), processes, devices)])
    return waves


@dataclasses.dataclass
class Rehearsal:
    config: Path
    out: Path
    processes: int
    devices: int
    seed: int = 0
    kill: bool = True
    block_workers: int = 2
    layers: int | None = None  # fewer decoder layers than shipped (the CI variants); None: the shipped count
    timeout_s: float = 1800.0
    log: Any = sys.stderr

    def say(self, msg: str) -> None:
        print(f"[rehearse] {msg}", file=self.log, flush=True)

    # ------------------------------------------------------------------------------------------- set-up

    def prepare(self) -> tuple[Config, Path]:
        """Writes the tiny model, data and shrunk config; returns (shrunk config, its path)."""
        from lolcats_jax.assets import shakespeare_dir
        from lolcats_jax.tokenizer import load_tokenizer

        shipped = load_config(self.config)
        total = self.processes * self.devices
        try:
            shipped.mesh.shape().resolve(total)
        except ValueError as e:
            raise UserError(f"{self.config}: the mesh does not fit {self.processes} × {self.devices} devices ({e})") from None
        arch = _architecture(shipped, self.config)
        if self.layers is not None and not 1 <= self.layers <= int(arch["num_hidden_layers"]):
            raise UserError(f"--layers {self.layers}: expected 1 to the config's {arch['num_hidden_layers']} layers")
        model_dir, data_dir = self.out / "model", self.out / "data"
        texts = fixtures.corpus_texts(shakespeare_dir())
        if not (model_dir / "model.safetensors.index.json").is_file():
            model_dir.mkdir(parents=True, exist_ok=True)
            fixtures.write_tokenizer(model_dir, texts["train"], shrink.VOCAB)
            tok = load_tokenizer(model_dir)
            tiny = shrink.shrink_architecture(arch, shrink.VOCAB)
            if self.layers is not None:
                tiny["num_hidden_layers"] = self.layers
            tiny.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
            files = fixtures.write_random_checkpoint(model_dir, tiny, self.seed)
            self.say(f"random weights: {len(files)} safetensors files + index in {model_dir}")
        data = fixtures.write_data(data_dir, texts)
        over = shrink.shrink_overrides(shipped, model_dir=str(model_dir), data=data, run_dir=str(self.out / "runs" / "cluster"),
                                       store_dir=str(self.out / "block_inputs" / "cluster"))
        cfg = load_config(self.config, over)
        path = self.out / "config.yaml"
        dump_config(cfg, path)
        write_text_atomic(self.out / "overrides.txt", "\n".join(over) + "\n")
        return cfg, path

    # ------------------------------------------------------------------------------------------- runs

    def run_wave(self, wave: list[launch.Job], cfg_path: Path, kill: launch.Kill | None, record: dict) -> None:
        logs = self.out / "logs"
        t0 = time.perf_counter()
        running = [launch.start(job, cfg_path, logs, 0) for job in wave]
        killed, target = None, None
        if kill is not None:
            target = next(r for r in running if kill.stage in r.job.stages)
            self.say(f"will SIGKILL process {kill.process} of {target.job.name} {kill.delay_s:.1f}s into '{kill.stage}'")
            killed = launch.run_with_kill(target, kill, self.timeout_s)
            self.say(f"kill: {killed['landed']} after {killed.get('killed_after_s')}s; last line: {killed.get('last_log_line')!r}")
            record["kill"] = dict(killed, job=target.job.name)
        for r in running:
            if r is not target:
                self._check_codes(r, launch.wait(r, self.timeout_s))
        if target is not None:  # the scheduler re-submits the killed job; it resumes
            r = launch.start(target.job, cfg_path, logs, 1)
            self._check_codes(r, launch.wait(r, self.timeout_s))
            record["kill"]["rerun"] = launch.rerun_summary(r.logs[0])
        for job in wave:
            record["jobs"].append({"job": job.name, "processes": job.processes, "devices": job.devices})
        record["jobs"][-1]["wave_seconds"] = round(time.perf_counter() - t0, 1)

    def _check_codes(self, r: launch.Running, codes: list[int]) -> None:
        if any(codes):
            tail = "\n".join(launch.last_line(l) for l in r.logs)
            why = (f"was killed at its time limit of {self.timeout_s:g} s (--timeout; a loaded machine needs more)"
                   if r.timed_out else f"exited {codes}")
            raise RehearsalFailure(f"job {r.job.name} {why}; last lines:\n{tail}\n(logs: {r.logs[0].parent})")

    def run(self) -> dict:
        t_all = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        # every job of the rehearsal compiles the same few programs again (each block job, the resumed job after the
        # kill): a persistent XLA cache shared by all of them, unless the caller already has one
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(self.out / "xla_cache"))
        cfg, cfg_path = self.prepare()
        from lolcats_jax.blockwise.layout import block_starts

        from lolcats_jax.model.llama_config import LlamaConfig

        num_layers = LlamaConfig.from_hf_dir(cfg.model.path).num_layers
        blockwise = "distill_block" in cfg.run.stages
        num_blocks = len(block_starts(num_layers, cfg.block.size)) if blockwise else None
        report: dict[str, Any] = {"config": str(self.config), "processes": self.processes, "devices": self.devices,
                                  "stages": list(cfg.run.stages), "jobs": [], "seed": self.seed,
                                  "layers": num_layers,
                                  "num_blocks": num_blocks}
        # the reference: every stage in one process on one device
        ref_dir = self.out / "runs" / "reference"
        trained = tuple(s for s in cfg.run.stages if s in TRAINING_STAGES)  # what the parameters are compared after
        ref_job = launch.Job("reference", (f"run.dir={ref_dir}", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.expert=1", "block.index=all",
                                           f"block.store={self.out / 'block_inputs' / 'reference'}",
                                           f"run.stages=[{','.join(trained)}]"), trained, 1, 1)
        t = time.perf_counter()
        r = launch.start(ref_job, cfg_path, self.out / "logs", 0)
        self._check_codes(r, launch.wait(r, self.timeout_s))
        report["reference_seconds"] = round(time.perf_counter() - t, 1)
        ref_summary = json.loads((ref_dir / "summary.json").read_text())
        self.say(f"reference (1 process × 1 device) finished in {report['reference_seconds']}s")

        waves = job_plan(cfg, self.processes, self.devices, self.block_workers, num_blocks)
        kill = self._choose_kill(cfg, waves, ref_summary) if self.kill else None
        t = time.perf_counter()
        for wave in waves:
            wave_kill = kill if kill is not None and any(kill.stage in j.stages for j in wave) else None
            self.run_wave(wave, cfg_path, wave_kill, report)
        report["cluster_seconds"] = round(time.perf_counter() - t, 1)
        self.say(f"{self.processes} × {self.devices} run finished in {report['cluster_seconds']}s")
        self.check(cfg, ref_dir, report)
        report["seconds"] = round(time.perf_counter() - t_all, 1)
        report["passed"] = not report["failures"]
        write_json_atomic(self.out / "report.json", report)
        write_text_atomic(self.out / "report.md", format_report(report))
        return report

    def _choose_kill(self, cfg: Config, waves, ref_summary: dict) -> launch.Kill:
        rng = random.Random(self.seed)
        stage = rng.choice(list(cfg.run.stages))
        wave = next(w for w in waves if any(stage in j.stages for j in w))
        job = next(j for j in wave if stage in j.stages)
        # the reference ran the stage whole; a job of a wave of block jobs runs its share of the blocks
        seconds = float(ref_summary.get(stage, {}).get("seconds", UNTIMED_STAGE_S)) / len(wave)
        return launch.Kill(stage, rng.randrange(job.processes), rng.uniform(0.0, 1.0) * seconds)

    # ------------------------------------------------------------------------------------------- checks

    def check(self, cfg: Config, ref_dir: Path, report: dict) -> None:
        run_dir = Path(cfg.run.dir)
        failures: list[str] = []
        missing = [s for s in cfg.run.stages if not (run_dir / s / "done.json").is_file()]
        if missing:
            failures.append(f"stages without done.json: {missing}")
        params = checks.compare_params(ref_dir, run_dir)
        report["params"] = params
        for name, p in params.items():
            if "missing" in p:
                failures.append(f"{name}: {p['missing']} result missing")
            elif p["max_rel"] > PARAM_RTOL:
                failures.append(f"{name}: parameters differ from the one-device run by {p['max_rel']:.2e} (relative) > {PARAM_RTOL}")
        losses = checks.compare_losses(ref_dir, run_dir)
        report["losses"] = losses
        if losses["max_rel"] is None or losses["max_rel"] > LOSS_RTOL or losses["missing"]:
            failures.append(f"logged losses differ from the one-device run: {losses}")
        hf_dir = run_dir / "export" / "hf"
        exp = checks.export_matches(run_dir, hf_dir)
        report["export"] = exp
        if exp["max_rel"] > EXPORT_RTOL:
            failures.append(f"exported HF logits differ from the JAX model by {exp['max_rel']:.2e} > {EXPORT_RTOL}")
        total = self.processes * self.devices
        mesh = f"data={cfg.mesh.data},fsdp={cfg.mesh.fsdp},tensor={cfg.mesh.tensor},expert={cfg.mesh.expert}"
        report["inference"] = {}
        for name, cmd in (
            ("generate", ["-m", "lolcats_jax.generate", "--model", str(run_dir), "--prompt", "To be, or not", "--max-new-tokens", "4", "--mesh", mesh]),
            ("evaluate", ["-m", "lolcats_jax.evaluate", "--model", str(run_dir), "--tasks", "arc_easy", "--limit", "2", "--mesh", mesh,
                          "--out", str(self.out / "evaluate_cli.json")]),
        ):
            t = time.perf_counter()
            res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=launch.child_env(total), timeout=self.timeout_s)
            report["inference"][name] = {"exit_code": res.returncode, "seconds": round(time.perf_counter() - t, 1),
                                         "mesh": mesh, "devices": total, "output": res.stdout.strip()[-300:]}
            if res.returncode:
                failures.append(f"{name} --mesh {mesh} on {total} devices exited {res.returncode}: {res.stderr.strip()[-500:]}")
        report["failures"] = failures


class RehearsalFailure(RuntimeError):
    """A job of the rehearsal failed."""


def _architecture(cfg: Config, config_path: Path) -> dict:
    if cfg.model.architecture:
        p = Path(cfg.model.architecture)
        if not p.is_absolute() and not p.is_file():
            p = Path.cwd() / p
        if not p.is_file():
            raise UserError(f"{config_path}: model.architecture={cfg.model.architecture} not found")
        return json.loads(p.read_text())
    p = Path(cfg.model.path) / "config.json"
    if not p.is_file():
        raise UserError(f"{config_path}: neither model.architecture nor {p} describes the model")
    return json.loads(p.read_text())


def format_report(r: dict) -> str:
    kill = r.get("kill") or {}
    lines = [
        f"# Rehearsal of {r['config']}", "",
        f"- layout: {r['processes']} processes × {r['devices']} devices; stages {r['stages']}; "
        f"{r.get('layers')} layers" + (f" ({r['num_blocks']} blocks)" if r.get("num_blocks") else ""),
        f"- reference (1 process × 1 device): {r.get('reference_seconds')} s; cluster layout: {r.get('cluster_seconds')} s; "
        f"all: {r.get('seconds')} s",
        f"- kill: process {kill.get('process')} of {kill.get('job')}, {kill.get('killed_after_s')} s into '{kill.get('stage')}' — "
        f"{kill.get('landed')}; re-run: {kill.get('rerun')}" if kill else "- kill: none",
        "", "| result | keys | max abs diff | max rel diff | bit-exact |", "|---|---:|---:|---:|---|",
    ]
    for name, p in r.get("params", {}).items():
        if "missing" in p:
            lines.append(f"| {name} | — | missing: {p['missing']} | | |")
        else:
            lines.append(f"| {name} | {p['keys']} | {p['max_abs']:.3g} | {p['max_rel']:.3g} | {'yes' if p['bit_exact'] else 'no'} |")
    if r.get("losses"):
        lo = r["losses"]
        lines += ["", f"- logged losses: {lo['records']} train / eval records, largest relative difference {lo['max_rel']:.2e}"]
    exp = r.get("export")
    if exp:
        lines += ["", f"- export: transformers loads {len(exp['files'])} files; logits vs JAX: {exp['max_rel']:.2e} (relative)"]
    for name, inf in r.get("inference", {}).items():
        lines.append(f"- {name} --mesh {inf['mesh']} on {inf['devices']} devices: exit {inf['exit_code']} in {inf['seconds']} s")
    lines += ["", "Result: " + ("PASSED" if r.get("passed") else "FAILED: " + "; ".join(r.get("failures", [])))]
    return "\n".join(lines) + "\n"
