"""The attention benchmark (lolcats_jax/bench) on tiny CPU shapes: grid, skip rules, markdown/JSON output, CLI."""

from __future__ import annotations

import json

from lolcats_jax.bench import attention
from lolcats_jax.bench.__main__ import main

TINY = attention.Shapes(B=1, H=2, D=16, F=8, W=16, dtype="float32")


def test_run_measures_and_skips_with_reasons(tmp_path):
    result = attention.run("cpu", TINY, [128, 64], reps=1, budget_s=30, only=["softmax xla"], log=lambda _: None)
    rows = result["rows"]
    assert [(r["T"], r["mode"]) for r in rows] == [(64, "fwd"), (64, "fwd+bwd"), (128, "fwd"), (128, "fwd+bwd")]
    assert all(r["median_s"] > 0 and r["mem_bytes"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert any("GPU only" in n for n in result["notes"])
    attention.write(result, str(tmp_path / "t.md"))
    text = (tmp_path / "t.md").read_text()
    assert "| softmax xla | 128 | fwd+bwd |" in text and "Scaling" in text
    assert json.loads((tmp_path / "t.json").read_text())["config"]["H"] == 2


def test_quadratic_rows_skip_when_maps_do_not_fit():
    need = attention.quadratic_bytes("hybrid", "fwd+bwd", attention.Shapes(1, 32, 128, 64, 64, "bfloat16"), 65536)
    assert need > 1e12  # 12 maps × 32 heads × 65536² × 4 bytes
    fl = attention.model_flops("softmax", TINY, 1024, backward=True)
    assert fl == 3.5 * 2.0 * 1 * 2 * 1024 * 1024 * 16


def test_cli_writes_table(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["attention", "--device", "cpu", "--lengths", "64", "--reps", "1", "--only", "softmax xla",
                 "--H", "2", "--D", "16", "--F", "8", "--W", "16", "--modes", "fwd", "--out", str(out)]) == 0
    assert "| softmax xla | 64 | fwd |" in (tmp_path / "cli.md").read_text()
    assert main(["attention", "--device", "gpu", "--lengths", "64"]) == 2  # no GPU here: refused, says why
    assert "requested but JAX runs on" in capsys.readouterr().err
