"""`python -m lolcats_jax.bench train`: the recipe's distill and finetune steps timed on a tiny model; the table and
JSON it writes hold every cell, with figures consistent with the cell's shape (tokens = A·B·T, tokens/s = tokens /
median step time) and the step's real losses (finite, positive: the distill MSE of fresh feature maps, the LM loss of
random tokens near ln V)."""

from __future__ import annotations

import json
import math

import pytest

from tests.train_fixtures import write_tiny_model


@pytest.mark.slow
def test_train_benchmark_cli(tmp_path, smollm2_dir, capsys):
    from lolcats_jax.bench.__main__ import main

    model = write_tiny_model(tmp_path / "model", smollm2_dir)
    out = tmp_path / "train"
    rc = main(["train", "--config", "configs/smollm2_demo.yaml", f"model.path={model}", "--lengths", "32", "80",
               "--batch", "2", "--accum", "2", "--reps", "2", "--out", str(out)])
    assert rc == 0
    assert "| stage | T | B | A |" in capsys.readouterr().out
    result = json.loads((tmp_path / "train.json").read_text())
    assert "| finetune | 80 | 2 | 2 |" in (tmp_path / "train.md").read_text()
    rows = {(r["stage"], r["T"]): r for r in result["rows"]}
    assert set(rows) == {(s, T) for s in ("distill", "finetune") for T in (32, 80)}
    for (stage, T), r in rows.items():
        assert r["tokens"] == 2 * 2 * T
        assert math.isclose(r["tokens_per_s"], r["tokens"] / r["step_s_median"], rel_tol=1e-2)
        assert 0 < r["step_s_min"] <= r["step_s_median"] and r["peak_mib"] > 0
        assert math.isfinite(r["first_loss"]) and r["first_loss"] > 0
    V = json.loads((model / "config.json").read_text())["vocab_size"]
    for T in (32, 80):  # random weights and tokens: the LM loss is of the order of ln V
        assert 0.3 * math.log(V) < rows[("finetune", T)]["first_loss"] < 3 * math.log(V)
