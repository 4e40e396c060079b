"""The Pallas launch-parameter tuner (kernels/lolcats/autotune.py): the search, the cache and its use by
Backend.PALLAS. On CPU the kernels run in interpret mode, so speed is not what is tested here (that is the GPU
check's tuning stage); a scripted cost table stands in for the device timing, and one real timing runs end to end."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import pytest
from lolcats_testutil import cast_tree, make_inputs, rel_rms

from kernels.lolcats import LolcatsSpec, lolcats_attention_reference
from kernels.lolcats import autotune
from kernels.lolcats.pallas_hybrid import PallasConfig
from lolcats_jax import compat

SPEC = LolcatsSpec(window="tk", window_size=16)
B, T, H, K, D, F = 1, 70, 4, 2, 16, 8  # 5 chunks of 16 in interpret mode's default layout


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(autotune.CACHE_ENV, str(path))
    return path


def _cost_table(cfg: PallasConfig) -> float:
    """A device where 4 backward warps, 2-chunk segments and 8 forward warps are fastest, two pipeline stages do
    not compile, and 32- or 128-wide value tiles are slower than 64."""
    if cfg.num_stages == 2:
        raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
    return (10.0 - 3.0 * (cfg.num_warps_bwd == 4) - 2.0 * (cfg.seg_chunks == 2) + 1.0 * (cfg.num_warps_fwd == 4)
            + 5.0 * (cfg.block_v == 128) + 0.5 * (cfg.block_v == 32))


def test_coordinate_descent_keeps_what_is_faster_and_skips_what_fails():
    def alternatives(cfg):
        return autotune.neighbours(cfg, SPEC, 128, 128, B * H, interpret=True)  # 8 chunks of 16, segments of 16 → 8

    best, trials = autotune.coordinate_descent(PallasConfig(), _cost_table, alternatives, budget_s=60)
    # fwd warps 4: slower; bwd warps 4: kept; block_v 32 / 128: slower; segments 2 (of 4): kept, 8 tried; 2 stages fail
    assert (best.num_warps_fwd, best.num_warps_bwd, best.block_v, best.seg_chunks, best.num_stages) == (8, 4, None, 2, 1)
    timed = {(t.config.num_warps_fwd, t.config.num_warps_bwd, t.config.block_v, t.config.seg_chunks, t.config.num_stages): t
             for t in trials}
    assert trials[0].config == PallasConfig() and trials[0].ms == 10.0
    assert timed[(4, 8, None, None, 1)].ms == 11.0  # tried, slower: not kept
    assert timed[(8, 4, None, None, 1)].ms == 7.0  # kept
    assert timed[(8, 4, 128, None, 1)].ms == 12.0 and timed[(8, 4, 32, None, 1)].ms == 7.5  # tried from the improved point
    failed = [t for t in trials if t.ms is None]
    assert len(failed) == 1 and failed[0].config.num_stages == 2 and "shared memory" in failed[0].error
    assert len(trials) == 8 and timed[(8, 4, None, 2, 1)].ms == 5.0 and timed[(8, 4, None, 8, 1)].ms == 7.0


def test_the_backend_runs_with_the_tuned_config_and_stays_exact(cache, monkeypatch):
    """`tune` writes the fastest configuration under the call's key; Backend.PALLAS, given no config, launches with it
    (segments of 2 chunks instead of interpret mode's 16) and its output still equals the float64 reference."""
    from kernels.lolcats import pallas as backend

    def measure(cfg):
        return _cost_table(cfg) if cfg.seg_chunks in (None, 2, 8) else 20.0

    entry = autotune.tune(SPEC, B, T, H, K, D, F, dtype="float32", measure=measure, budget_s=60)
    data = json.loads(cache.read_text())
    assert list(data) == [entry["key"]] and "cpu" in entry["key"] and "B1 T70 H4 K2 D16 Dv16 F8" in entry["key"]
    assert entry["config"]["num_warps_bwd"] == 4 and entry["config"]["seg_chunks"] == 2
    assert entry["default_ms"] == 10.0 and entry["ms"] == 5.0
    seen = []
    real = backend.pallas_lolcats_attention
    monkeypatch.setattr(backend, "pallas_lolcats_attention", lambda *a: seen.append(a[-1]) or real(*a))
    q, k, v, fmap, theta = make_inputs(0, B, T, H, D, F, K=K)
    y = backend.lolcats_attention_pallas(q, k, v, fmap, theta, SPEC)
    tuned = autotune.cached_config(entry["key"])
    assert seen == [tuned] and tuned.num_warps_bwd == 4 and tuned.seg_chunks == entry["config"]["seg_chunks"]
    with compat.enable_x64():
        ref = lolcats_attention_reference(*cast_tree((q, k, v, fmap, theta), jnp.float64), SPEC)
    assert rel_rms(y, ref) < 1e-5
    # another shape, dtype or device kind is not this entry: the defaults
    assert autotune.config_for(SPEC, (B, T + 1, H, D), (B, T + 1, K, D), (B, T + 1, K, D), F, "float32") == PallasConfig()
    assert autotune.config_for(SPEC, (B, T, H, D), (B, T, K, D), (B, T, K, D), F, "bfloat16") == PallasConfig()
    assert autotune.cached_config(entry["key"].replace("cpu", "NVIDIA H100 80GB HBM3", 1)) is None


def test_real_timing_end_to_end(cache):
    """The device timer itself (interpret mode here): the defaults and one alternative compiled, run and timed."""
    entry = autotune.tune(SPEC, B, 40, 2, 2, D, F, dtype="float32", reps=1, budget_s=0.0)
    assert entry["default_ms"] > 0 and len(entry["trials"]) >= 1 and entry["trials"][0]["error"] is None
    assert entry["config"] == {f: getattr(PallasConfig(), f) for f in autotune.TUNED_FIELDS}  # nothing else tried


def test_a_broken_cache_is_a_clear_error(cache):
    cache.write_text("{not json")
    with pytest.raises(ValueError, match=r"tuning\.json: unreadable Pallas tuning cache"):
        autotune.config_for(SPEC, (B, T, H, D), (B, T, K, D), (B, T, K, D), F, "float32")
    cache.write_text(json.dumps({"some key": {"ms": 1.0}}))
    with pytest.raises(ValueError, match=r"tuning\.json: expected"):
        autotune.cached_config("some key")


def test_tuning_keeps_other_entries(cache):
    other = {"NVIDIA H100 80GB HBM3|bfloat16|hybrid/tk64/softmax_dim-full|B1 T1024 H32 K8 D128 Dv128 F64":
             {"config": dataclasses.asdict(PallasConfig(num_warps_bwd=4)) | {"interpret": None}, "ms": 1.0}}
    cache.write_text(json.dumps(other))
    entry = autotune.tune(SPEC, B, T, H, K, D, F, dtype="float32", measure=_cost_table, budget_s=60)
    data = json.loads(cache.read_text())
    assert set(data) == set(other) | {entry["key"]}
    assert autotune.cached_config(next(iter(other))).num_warps_bwd == 4
