"""YAML configs → typed frozen dataclasses: every shipped config parses; bad keys/types are clear errors."""

import dataclasses
import glob
import os

import pytest

from lolcats_jax.config import Config, ConfigError, dump_config, load_config

SHIPPED = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "**", "*.yaml"), recursive=True))


def test_there_are_shipped_configs():
    names = {os.path.basename(p) for p in SHIPPED}
    assert {"smollm2_demo.yaml", "llama3_1_8b.yaml", "llama3_1_70b.yaml", "llama3_1_405b.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.basename(p) for p in SHIPPED])
def test_every_shipped_config_parses(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.seed = 3  # type: ignore[misc]
    # the resolved config written to a run directory loads back to the same value
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg


def test_dotted_overrides(tmp_path):
    cfg = load_config(SHIPPED[0], ["distill.optim.lr=3e-3", "mesh.fsdp=2", "attention.softmax_layers=[0, 5]", "run.dir=/x/y"])
    assert cfg.distill.optim.lr == 3e-3 and cfg.mesh.fsdp == 2
    assert cfg.attention.softmax_layers == (0, 5) and cfg.run.dir == "/x/y"


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  optim:\n    learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert str(bad) in msg and "distill.optim" in msg and "learning_rate" in msg and "'lr'" in msg


def test_unknown_section(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['trainer'\].*valid keys"):
        load_config(bad)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("distill.max_steps=ten", "distill.max_steps: expected an integer"),
        ("model.remat=maybe", "model.remat: expected true/false"),
        ("attention.window=xx", "attention.window='xx' is not one of"),
        ("run.stages=[distill, bogus]", "run.stages contains 'bogus'"),
        ("distill.optim=3", "distill.optim: expected a mapping"),
        ("nokeyvalue", "must look like key.sub=value"),
        ("finetune.lora.dropout=1.0", "finetune.lora.dropout=1.0 must be a probability"),
        ("finetune.xent_factor=0", "finetune.xent_factor=0.0 and finetune.kl_factor=0.0 must be ≥ 0 and not both 0"),
        ("evaluate.perplexity_chunk_len=0", "evaluate.perplexity_chunk_len=0 must be ≥ 1"),
        ("finetune.kl_factor=-1", "finetune.xent_factor=1.0 and finetune.kl_factor=-1.0 must be"),
    ],
)
def test_wrong_types_and_values(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        load_config(SHIPPED[0], [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/x.yaml")
