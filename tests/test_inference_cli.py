"""`generate` and `evaluate` on a device mesh (`--mesh`, 8 fake CPU devices) give what they give on one device."""

from __future__ import annotations

import json

import pytest

from lolcats_jax.cli import run_main
from tests.train_fixtures import write_tiny_data, write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    from lolcats_jax.assets import shakespeare_dir

    root = tmp_path_factory.mktemp("inference")
    return write_tiny_model(root / "model", smollm2_dir), write_tiny_data(root / "data", shakespeare_dir())


def test_evaluate_on_a_mesh_equals_one_device(tiny, tmp_path):
    from lolcats_jax.evaluate import main

    model, data = tiny
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"context": f"Question {i}: what comes next?", "choices": [" yes", " no", " maybe"],
                                        "gold": i % 3}) + "\n" for i in range(6)))
    out = {}
    for name, mesh in (("one", []), ("mesh", ["--mesh", "data=2,fsdp=4"])):
        path = tmp_path / f"{name}.json"
        assert run_main(main, ["--model", str(model), "--task-file", str(task), "--perplexity", str(data / "heldout.txt"),
                               "--ppl-chunk-len", "64", "--ppl-max-tokens", "256", "--long-context", str(data / "heldout.txt"),
                               "--long-context-length", "70", "--long-context-windows", "2", "--out", str(path), *mesh]) == 0
        out[name] = json.loads(path.read_text())
    assert out["mesh"]["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1} and out["one"]["mesh"] is None
    a, b = out["one"]["perplexity"], out["mesh"]["perplexity"]
    assert a["n_tokens"] == b["n_tokens"] == 255 and abs(a["nll_per_token"] - b["nll_per_token"]) < 1e-5
    ta, tb = out["one"]["tasks"]["task"], out["mesh"]["tasks"]["task"]
    assert {k: ta[k] for k in ("n", "acc", "acc_norm")} == {k: tb[k] for k in ("n", "acc", "acc_norm")}
    la, lb = out["one"]["long_context"], out["mesh"]["long_context"]  # rows padded to the mesh's 8 batch shards
    assert (la["windows"], la["length"], [b[:2] for b in la["bands"]]) == (2, 70, [[0, 64], [64, 70]])
    assert all(abs(x[2] - y[2]) < 1e-5 for x, y in zip(la["bands"], lb["bands"])) and abs(la["nll"] - lb["nll"]) < 1e-5


def test_evaluate_long_context_beyond_the_model_is_a_clear_error(tiny, capsys):
    from lolcats_jax.evaluate import main

    model, data = tiny
    assert run_main(main, ["--model", str(model), "--long-context", str(data / "heldout.txt"),
                           "--long-context-length", "100000"]) == 2
    assert "--long-context-length 100000 exceeds the model's context" in capsys.readouterr().err


def test_generate_on_a_mesh_equals_one_device(tiny, capsys):
    from lolcats_jax.generate import main

    model, _ = tiny
    texts = {}
    for name, mesh in (("one", []), ("mesh", ["--mesh", "fsdp=-1"])):
        assert run_main(main, ["--model", str(model), "--prompt", "Once upon a time", "--max-new-tokens", "12", *mesh]) == 0
        texts[name] = capsys.readouterr().out
    assert texts["one"] == texts["mesh"] and texts["one"].startswith("Once upon a time") and len(texts["one"]) > 20
    assert run_main(main, ["--model", str(model), "--prompt", "x", "--mesh", "fsdp=x"]) == 2
    assert "error: --mesh fsdp=x: size of 'fsdp' must be an integer" in capsys.readouterr().err
