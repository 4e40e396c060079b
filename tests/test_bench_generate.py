"""`python -m lolcats_jax.bench generate`: runs on a tiny linearized model and its teacher, writes the table, and the
memory it reports behaves as the two attention kinds must (independent formulas, not the benchmark's own figures)."""

from __future__ import annotations

import json

import pytest

from tests.train_fixtures import TINY, write_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", smollm2_dir)


def test_generate_benchmark_cli(tiny_dir, tmp_path, capsys):
    from lolcats_jax.bench.__main__ import main

    lengths, N, B = (16, 64), 4, 2
    out = tmp_path / "gen"
    rc = main(["generate", "--model", str(tiny_dir), "--linearize", "--lengths", *map(str, lengths),
               "--decode-tokens", str(N), "--batch", str(B), "--reps", "1", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| model | layers | context T |" in printed
    result = json.loads((tmp_path / "gen.json").read_text())
    assert "| linearized |" in (tmp_path / "gen.md").read_text()
    rows = {(r["model"], r["T"]): r for r in result["rows"]}
    assert set(rows) == {(m, T) for m in ("linearized", "teacher") for T in lengths}
    for r in rows.values():
        assert "skip" not in r, r
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["decode_peak_bytes"] > 0

    L, K, Dh = TINY["num_hidden_layers"], TINY["num_key_value_heads"], TINY["head_dim"]
    for T in lengths:
        # softmax teacher: a KV cache of T + N + 1 slots per layer (k and v, fp32) plus the (B,) positions
        assert rows[("teacher", T)]["cache_bytes"] == 2 * L * B * (T + N + 1) * K * Dh * 4 + B * 4
    # linearized: the recurrent state does not depend on the context length
    assert rows[("linearized", lengths[0])]["cache_bytes"] == rows[("linearized", lengths[1])]["cache_bytes"]
    assert rows[("linearized", lengths[0])]["cache_bytes"] > 0


def test_generate_benchmark_refuses_a_softmax_directory_without_linearize(tiny_dir, capsys):
    from lolcats_jax.bench.__main__ import main

    assert main(["generate", "--model", str(tiny_dir), "--lengths", "16"]) == 2
    assert "--linearize" in capsys.readouterr().err
