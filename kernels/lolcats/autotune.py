"""Launch parameters of the Pallas LoLCATS kernels chosen per shape by measurement, and cached.

Triton's `@autotune` (fla's kernels use it) times its candidates when a kernel is first launched. Here the kernels
are compiled into an XLA program, so the choice has to be made before tracing: `tune` runs the candidate
`PallasConfig`s eagerly on the device (forward + backward, the training step's use), keeps the fastest and records
it in a JSON cache keyed by device kind, dtype, window and the per-shard shapes the kernel sees; the backend
(`pallas_lolcats_attention` without an explicit config) looks the shape up at trace time and uses the defaults for a
shape nobody tuned. Tune once per machine type and shape:

    python -m kernels.lolcats.autotune --batch 1 --seq 1024 --heads 32 --kv-heads 8 --head-dim 128 --feature-dim 64

The search is a coordinate descent from the defaults (one parameter at a time, keeping what is faster), not the
full product: each candidate costs a compilation of the six kernels (seconds on a GPU). A candidate that fails to
compile (e.g. shared memory beyond the device's with num_stages > 1) is recorded and skipped.

The cache file is `$LOLCATS_PALLAS_TUNING` or `~/.cache/lolcats_jax/pallas_tuning.json`; it is written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from kernels.lolcats.pallas_hybrid import PallasConfig, make_layout, pallas_lolcats_attention
from kernels.lolcats.spec import FeatureMapParams, LolcatsSpec
from kernels.lolcats.timing import random_inputs, time_jitted
from lolcats_jax.fsio import write_json_atomic

CACHE_ENV = "LOLCATS_PALLAS_TUNING"
TUNED_FIELDS = ("num_warps_fwd", "num_warps_bwd", "block_v", "seg_chunks", "num_stages")


def cache_path() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lolcats_jax" / "pallas_tuning.json")


def device_kind() -> str:
    return str(jax.devices()[0].device_kind)


def tuning_key(spec: LolcatsSpec, B: int, T: int, H: int, K: int, D: int, Dv: int, F: int, dtype,
               device: str | None = None) -> str:
    """The cache key of one kernel call: device kind, dtype, form / window / size, and its (per-shard) shapes."""
    return (f"{device or device_kind()}|{jnp.dtype(dtype).name}|{spec.form}/{spec.window}{spec.window_size}"
            f"/{spec.feature_map}{'-full' if spec.fullspace else ''}|B{B} T{T} H{H} K{K} D{D} Dv{Dv} F{F}")


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable Pallas tuning cache ({e}); delete it or point {CACHE_ENV} elsewhere") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) and isinstance(v.get("config"), dict) for v in data.values()):
        raise ValueError(f"{path}: expected {{key: {{\"config\": {{...}}, ...}}}} (a Pallas tuning cache); delete it "
                         f"or point {CACHE_ENV} elsewhere")
    return data


_memo: dict[tuple[str, float], dict] = {}


def cached_config(key: str, path: Path | None = None) -> PallasConfig | None:
    """The tuned PallasConfig of `key`, or None when the cache has none (re-read when the file changes)."""
    path = path or cache_path()
    stamp = path.stat().st_mtime if path.is_file() else -1.0
    memo_key = (str(path), stamp)
    if memo_key not in _memo:
        _memo[memo_key] = _read(path)
    entry = _memo[memo_key].get(key)
    if entry is None:
        return None
    fields = {k: v for k, v in entry["config"].items() if k in TUNED_FIELDS}
    return dataclasses.replace(PallasConfig(), **fields)


def config_for(spec: LolcatsSpec, q_shape, k_shape, v_shape, F: int, dtype) -> PallasConfig:
    """What the backend runs a call with when no config is given: the cached choice, else the defaults."""
    B, T, H, D = q_shape
    tuned = cached_config(tuning_key(spec, B, T, H, k_shape[2], D, v_shape[-1], F, dtype))
    return tuned if tuned is not None else PallasConfig()


# ----------------------------------------------------------------------------------------------- search


def neighbours(cfg: PallasConfig, spec: LolcatsSpec, T: int, Dv: int, batch_heads: int, interpret: bool
               ) -> dict[str, list[PallasConfig]]:
    """Per tuned field, the alternatives to `cfg` worth timing at this shape: the other warp count of each kernel
    group, value tiles of 32 / 64 / 128, half and twice the segment length, two pipeline stages."""
    lay = make_layout(spec, T, 16, Dv, 16, cfg, interpret, batch_heads)  # D, F do not change the segments
    seg, n = lay.seg_chunks, lay.num_chunks
    return {
        "num_warps_fwd": [dataclasses.replace(cfg, num_warps_fwd=w) for w in (4, 8) if w != cfg.num_warps_fwd],
        "num_warps_bwd": [dataclasses.replace(cfg, num_warps_bwd=w) for w in (4, 8) if w != cfg.num_warps_bwd],
        "block_v": [dataclasses.replace(cfg, block_v=b) for b in (32, 64, 128) if b <= Dv and Dv % b == 0 and b != lay.block_v],
        "seg_chunks": [dataclasses.replace(cfg, seg_chunks=x) for x in sorted({max(1, seg // 2), min(n, seg * 2)}) if x != seg],
        "num_stages": [dataclasses.replace(cfg, num_stages=x) for x in (1, 2) if x != cfg.num_stages],
    }


@dataclasses.dataclass
class Trial:
    config: PallasConfig
    ms: float | None  # None: failed
    error: str | None = None


def coordinate_descent(start: PallasConfig, measure: Callable[[PallasConfig], float], alternatives, budget_s: float
                       ) -> tuple[PallasConfig, list[Trial]]:
    """From `start`, for each field in turn, time its alternatives and move to the fastest if it beats the current
    best; `measure` returns ms or raises. Stops trying new candidates after `budget_s`."""
    trials: list[Trial] = []
    deadline = time.monotonic() + budget_s

    def run(cfg):
        try:
            trials.append(Trial(cfg, float(measure(cfg))))
        except Exception as e:  # noqa: BLE001  (a candidate that does not compile or run is skipped, with its reason)
            trials.append(Trial(cfg, None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
        return trials[-1].ms

    best, best_ms = start, run(start)
    if best_ms is None:
        raise RuntimeError(f"the default Pallas configuration failed at this shape: {trials[-1].error}")
    for field in TUNED_FIELDS:
        for cfg in alternatives(best).get(field, []):
            if time.monotonic() > deadline:
                return best, trials
            ms = run(cfg)
            if ms is not None and ms < best_ms:
                best, best_ms = cfg, ms
    return best, trials


def _timer(spec: LolcatsSpec, args, reps: int) -> Callable[[PallasConfig], float]:
    """Milliseconds of one forward + backward (all differentiable inputs) with a given launch config."""
    q, k, v, fmap, theta = args

    def measure(cfg: PallasConfig) -> float:
        def loss(q, k, v, wq, wk, theta):
            y = pallas_lolcats_attention(q, k, v, FeatureMapParams(wq, wk, None, None), theta, spec, cfg)
            return jnp.sum(y.astype(jnp.float32))

        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        return time_jitted(step, (q, k, v, fmap.wq, fmap.wk, theta), reps)["median_s"] * 1e3

    return measure


def tune(spec: LolcatsSpec, B: int, T: int, H: int, K: int, D: int, F: int, Dv: int | None = None,
         dtype="bfloat16", *, reps: int = 10, budget_s: float = 120.0, path: Path | None = None,
         measure: Callable[[PallasConfig], float] | None = None, seed: int = 0) -> dict:
    """Times the candidates at this shape (forward + backward of random inputs), writes the fastest to the cache and
    returns its entry {"config", "ms", "default_ms", "trials"}. `measure` replaces the device timing (tests)."""
    Dv = Dv or D
    interpret = PallasConfig().resolve_interpret()
    key = tuning_key(spec, B, T, H, K, D, Dv, F, dtype)
    if measure is None:
        args, _ = random_inputs(B, T, H, K, D, F, dtype, Dv=Dv, seed=seed)
        measure = _timer(spec, args, reps)
    best, trials = coordinate_descent(PallasConfig(), measure, lambda c: neighbours(c, spec, T, Dv, B * H, interpret),
                                      budget_s)
    entry = {
        "config": {f: getattr(best, f) for f in TUNED_FIELDS},
        "ms": next(t.ms for t in trials if t.config == best and t.ms is not None),
        "default_ms": trials[0].ms,
        "trials": [{"config": {f: getattr(t.config, f) for f in TUNED_FIELDS}, "ms": t.ms, "error": t.error} for t in trials],
        "jax": jax.__version__, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path = path or cache_path()
    data = _read(path)
    data[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    return {"key": key, **entry}


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.lolcats.autotune", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1, help="batch rows per device (per shard)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=32, help="query heads per device (per shard)")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--feature-dim", type=int, default=64)
    ap.add_argument("--window", choices=["tk", "sw"], default="tk")
    ap.add_argument("--window-size", type=int, default=64)
    ap.add_argument("--form", choices=["hybrid", "linear"], default="hybrid")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds after which no new candidate is started")
    args = ap.parse_args(argv)
    spec = LolcatsSpec(form=args.form, window=args.window, window_size=args.window_size)
    res = tune(spec, args.batch, args.seq, args.heads, args.kv_heads, args.head_dim, args.feature_dim, None, args.dtype,
               reps=args.reps, budget_s=args.budget)
    print(f"# {res['key']} on {device_kind()}\n\n| config | fwd+bwd ms |\n|---|---:|")
    for t in res["trials"]:
        print(f"| {t['config']} | {t['ms']:.3f} |" if t["ms"] is not None else f"| {t['config']} | failed: {t['error']} |")
    print(f"\nchosen {res['config']}: {res['ms']:.3f} ms (defaults {res['default_ms']:.3f} ms); cache {cache_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
