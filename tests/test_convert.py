"""HF ⇄ Flax conversion: parity with transformers, bit-exact round trips, sharded slice-wise loading, Orbax
checkpoints across meshes, refusal of bad input, atomic export (convert/)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors
import torch
import transformers
from flax import nnx

from convert import checkpoint, flax_to_hf, hf_to_flax, safetensors_io
from convert.errors import ConversionError
from convert.safetensors_io import SafetensorsDir, SafetensorsFile, save_file
from lolcats_jax import sharding as shd
from lolcats_jax.model import Llama, LoraOptions, ModelOptions

REPO = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
MESHES = {"fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2), "data2_fsdp4": dict(data=2, fsdp=4, tensor=1),
          "fsdp2_tensor2_expert2": dict(data=1, fsdp=2, tensor=2, expert=2)}


def make_hf(path: Path, *, dtype=torch.float32, tied=False, shard=None, arch="llama", seed=0) -> Path:
    """A tiny random HF checkpoint written by transformers itself (norms perturbed away from 1)."""
    torch.manual_seed(seed)
    if arch == "mistral":
        cfg = transformers.MistralConfig(**TINY, tie_word_embeddings=tied, rope_theta=10000.0, sliding_window=None)
        model = transformers.MistralForCausalLM(cfg)
    elif arch == "qwen2":  # biases on q, k, v
        cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=tied, rope_theta=1000000.0, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "qwen3":  # RMSNorm of q and k per head
        cfg = transformers.Qwen3Config(**TINY, tie_word_embeddings=tied, rope_theta=1000000.0, use_sliding_window=False)
        model = transformers.Qwen3ForCausalLM(cfg)
    elif arch == "mixtral":  # a router over 4 SwiGLU experts, top 2 per token
        cfg = transformers.MixtralConfig(**TINY, tie_word_embeddings=tied, rope_theta=1000000.0, num_local_experts=4,
                                         num_experts_per_tok=2)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**TINY, tie_word_embeddings=tied, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in name else p.copy_(0.05 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def hf_bytes(model_dir: Path) -> dict[str, tuple[str, bytes]]:
    """Every tensor of an HF directory as (dtype, raw bytes), read with the official safetensors package."""
    files = sorted(model_dir.glob("*.safetensors"))
    out = {}
    for f in files:
        with safetensors.safe_open(str(f), framework="pt") as g:
            for k in g.keys():
                t = g.get_tensor(k).contiguous()
                out[k] = (str(t.dtype), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return out


def flat_params(model: Llama) -> dict[tuple, jax.Array]:
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def expected_specs(model: Llama, mesh) -> dict[tuple, object]:
    abstract = nnx.eval_shape(lambda: Llama(model.cfg, model.opts, rngs=nnx.Rngs(0)))
    shardings = shd.param_shardings(nnx.state(abstract, nnx.Param), mesh)
    return {p: s.spec for p, s in nnx.to_flat_state(shardings)}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "fp32_single_untied": make_hf(root / "a"),
        "fp32_multi_tied": make_hf(root / "b", tied=True, shard="20KB", seed=1),
        "bf16_single_tied": make_hf(root / "c", dtype=torch.bfloat16, tied=True, seed=2),
        "bf16_multi_untied": make_hf(root / "d", dtype=torch.bfloat16, shard="30KB", seed=3),
        "mistral_fp32": make_hf(root / "e", arch="mistral", seed=4),
        "qwen2_fp32_tied": make_hf(root / "f", arch="qwen2", tied=True, seed=5),
        "qwen3_bf16_multi": make_hf(root / "g", arch="qwen3", dtype=torch.bfloat16, shard="30KB", seed=6),
        "qwen3_fp32": make_hf(root / "h", arch="qwen3", seed=7),
        "mixtral_fp32": make_hf(root / "i", arch="mixtral", seed=8),
        "mixtral_bf16_multi": make_hf(root / "j", arch="mixtral", dtype=torch.bfloat16, shard="30KB", tied=True, seed=9),
    }


# ------------------------------------------------------------------------------------------ parity, round trip


@pytest.mark.parametrize("name", ["fp32_single_untied", "fp32_multi_tied", "mistral_fp32", "qwen2_fp32_tied",
                                  "qwen3_fp32", "mixtral_fp32"])
def test_logits_match_transformers(hf_dirs, name):
    d = hf_dirs[name]
    model = hf_to_flax.load_hf_params(d, param_dtype="float32")
    tokens = np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, 37))
    ours = np.asarray(model(jax.numpy.asarray(tokens)))
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model.eval()(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-5


@pytest.mark.parametrize("name", ["qwen2_fp32_tied", "qwen3_fp32", "mixtral_fp32"])
def test_greedy_generation_matches_transformers(hf_dirs, name):
    """The converted Qwen2 / Qwen3 / Mixtral generate (cached prefill + decode) the tokens transformers' own classes do."""
    from lolcats_jax.inference.generation import Generator

    d = hf_dirs[name]
    model = hf_to_flax.load_hf_params(d, param_dtype="float32")
    prompts = np.random.RandomState(1).randint(0, TINY["vocab_size"], (2, 7))
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model.eval().generate(torch.tensor(prompts), max_new_tokens=12, do_sample=False, pad_token_id=0,
                                        eos_token_id=None).numpy()
    assert Generator(model).generate([list(p) for p in prompts], 12) == ref[:, 7:].tolist()


@pytest.mark.parametrize("name", ["fp32_single_untied", "fp32_multi_tied", "bf16_single_tied", "bf16_multi_untied",
                                  "mistral_fp32", "qwen2_fp32_tied", "qwen3_bf16_multi", "mixtral_bf16_multi"])
def test_round_trip_is_bit_exact(hf_dirs, tmp_path, name):
    src = hf_dirs[name]
    dtype = "bfloat16" if "bf16" in name else "float32"
    model = hf_to_flax.load_hf_params(src, param_dtype=dtype)
    multi = "multi" in name
    written = flax_to_hf.export_hf(model, tmp_path / "out", max_shard_size="25KB" if multi else "5GB")
    assert ((tmp_path / "out" / safetensors_io.INDEX_FILE) in written) == multi
    assert (len([p for p in written if p.suffix == ".safetensors"]) > 1) == multi
    a, b = hf_bytes(src), hf_bytes(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k] == b[k], k
    assert hf_to_flax.read_config(tmp_path / "out") == hf_to_flax.read_config(src)
    # transformers reads the export (sharded index included) and gets the same model
    t = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert str(t.dtype) == f"torch.{dtype}"


# --------------------------------------------------------------------------------------- sharded, slice-wise


@pytest.mark.parametrize("mesh_name,source", [(m, "fp32_single_untied") for m in MESHES]
                         + [("fsdp4_tensor2", "qwen2_fp32_tied"), ("fsdp4_tensor2", "qwen3_fp32"),
                            ("fsdp2_tensor2_expert2", "mixtral_fp32")])
def test_sharded_load_reads_only_slices(hf_dirs, monkeypatch, mesh_name, source):
    d = hf_dirs[source]
    reference = flat_params(hf_to_flax.load_hf_params(d, param_dtype="float32"))
    reads: dict[str, list[int]] = {}
    original = SafetensorsDir.slice

    def spy(self, name, index):
        out = original(self, name, index)
        reads.setdefault(name, []).append(out.nbytes)
        return out

    monkeypatch.setattr(SafetensorsDir, "slice", spy)
    mesh = shd.make_mesh(MESHES[mesh_name])
    model = hf_to_flax.load_hf_params(d, mesh, param_dtype="float32")
    specs = expected_specs(model, mesh)
    got = flat_params(model)
    assert set(got) == set(reference) == set(specs)
    for path, arr in got.items():
        assert arr.sharding.spec == specs[path], path
        assert arr.sharding.mesh == mesh
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(reference[path]))
    files = SafetensorsDir(d)
    assert set(reads) == set(files.keys())
    sharded_hf = 0
    for name, sizes in reads.items():
        full = files.info(name).nbytes
        assert sum(sizes) == full, name  # every byte read exactly once, replicas included
        sharded_hf += len(sizes) > 1
        if len(sizes) > 1:
            assert max(sizes) < full
    # q/k/v/o/gate/up/down, embed, head split on every mesh (each expert's matrices too)
    assert sharded_hf >= 7 * TINY["num_hidden_layers"] + 2


def test_extra_params_keep_fresh_init(hf_dirs):
    opts = ModelOptions(param_dtype="float32", layer_kinds=("softmax", "lolcats", "lolcats"), lora=LoraOptions(rank=4))
    mesh = shd.make_mesh(MESHES["fsdp4_tensor2"])
    model = hf_to_flax.load_hf_params(hf_dirs["fp32_single_untied"], mesh, param_dtype="float32", opts=opts, seed=3)
    fresh = flat_params(Llama(model.cfg, opts, rngs=nnx.Rngs(3)))
    base = flat_params(hf_to_flax.load_hf_params(hf_dirs["fp32_single_untied"], param_dtype="float32"))
    specs = expected_specs(model, mesh)
    got = flat_params(model)
    extra = set(got) - set(base)
    assert {p[0] for p in extra} == {"lolcats", "lora"}
    for p, arr in got.items():
        want = base[p] if p in base else fresh[p]
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(want), err_msg=str(p))
        assert arr.sharding.spec == specs[p], p


# ------------------------------------------------------------------------------------------------- Orbax


def test_orbax_restore_onto_another_mesh(hf_dirs, tmp_path):
    opts = ModelOptions(param_dtype="bfloat16", lora=LoraOptions(rank=4))
    mesh_a, mesh_b = shd.make_mesh(MESHES["fsdp4_tensor2"]), shd.make_mesh(MESHES["data2_fsdp4"])
    model = hf_to_flax.load_hf_params(hf_dirs["bf16_multi_untied"], mesh_a, param_dtype="bfloat16", opts=opts)
    step_dir = checkpoint.save_checkpoint(model, tmp_path / "ck")
    restored = checkpoint.load_checkpoint(tmp_path / "ck", mesh_b)
    assert restored.cfg == model.cfg and restored.opts == model.opts
    before, after, specs = flat_params(model), flat_params(restored), expected_specs(restored, mesh_b)
    assert set(before) == set(after)
    for p in before:
        assert after[p].dtype == before[p].dtype and after[p].sharding.spec == specs[p], p
        assert after[p].sharding.mesh == mesh_b
        np.testing.assert_array_equal(np.asarray(after[p]), np.asarray(before[p]))
    assert specs[("layers", "wq")] != expected_specs(model, mesh_a)[("layers", "wq")]
    with pytest.raises(ConversionError, match="already exists"):
        checkpoint.save_checkpoint(model, tmp_path / "ck")
    # an unfinished step (no commit marker / temporary name) is refused
    (step_dir / checkpoint.COMMIT_MARKER).unlink()
    with pytest.raises(ConversionError, match="commit marker"):
        checkpoint.load_checkpoint(tmp_path / "ck", mesh_b)
    step_dir.rename(tmp_path / "ck" / "0.orbax-checkpoint-tmp-1")
    with pytest.raises(ConversionError, match="no finalized checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "ck")


def test_cli_round_trip(hf_dirs, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_dirs["bf16_multi_untied"], src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    assert hf_to_flax.main(["--hf", str(src), "--out", str(tmp_path / "ck"), "--mesh", "fsdp=4,tensor=2", "--dtype", "bfloat16"]) == 0
    out = tmp_path / "out"
    assert flax_to_hf.main(["--ckpt", str(tmp_path / "ck"), "--out", str(out), "--tokenizer-from", str(src), "--max-shard-size", "30KB"]) == 0
    assert hf_bytes(out) == hf_bytes(src)
    assert (out / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()


# ------------------------------------------------------------------------------------------------ bad input


def _rewrite(model_dir: Path, edit) -> None:
    """Rewrites a single-file checkpoint with `edit(dict of arrays)` applied."""
    f = SafetensorsFile(model_dir / "model.safetensors")
    tensors = {k: f.read(k) for k in f.keys()}
    f.close()
    edit(tensors)
    save_file(tensors, model_dir / "model.safetensors")


BAD = {
    "missing": (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"),
    "unexpected": (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", np.zeros(64, np.float32)),
                   r"unexpected tensor.*model\.layers\.0\.self_attn\.q_proj\.bias"),
    "shape": (lambda t: t.__setitem__("model.layers.2.mlp.down_proj.weight", np.zeros((64, 80), np.float32)),
              r"model\.layers\.2\.mlp\.down_proj\.weight.*shape \[64, 80\], expected \[64, 96\]"),
    "int_dtype": (lambda t: t.__setitem__("model.norm.weight", np.ones(64, np.int32)), r"model\.norm\.weight.*dtype I32"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tensors_are_refused(hf_dirs, tmp_path, case):
    d = shutil.copytree(hf_dirs["fp32_single_untied"], tmp_path / "m")
    edit, pattern = BAD[case]
    _rewrite(d, edit)
    with pytest.raises(ConversionError, match=pattern):
        hf_to_flax.load_hf_params(d, param_dtype="float32")


def test_ignored_tensors_are_accepted(hf_dirs, tmp_path):
    d = shutil.copytree(hf_dirs["fp32_single_untied"], tmp_path / "m")
    _rewrite(d, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", np.ones(8, np.float32)))
    model = hf_to_flax.load_hf_params(d, param_dtype="float32")
    assert model.cfg.num_layers == TINY["num_hidden_layers"]


def test_truncated_file_is_refused(hf_dirs, tmp_path):
    d = shutil.copytree(hf_dirs["fp32_single_untied"], tmp_path / "m")
    f = d / "model.safetensors"
    last = max(SafetensorsFile(f).tensors.values(), key=lambda t: t.end).name
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    with pytest.raises(ConversionError, match=rf"{f}.*truncated.*{last}"):
        hf_to_flax.load_hf_params(d, param_dtype="float32")


def test_missing_shard_is_refused(hf_dirs, tmp_path):
    d = shutil.copytree(hf_dirs["fp32_multi_tied"], tmp_path / "m")
    sorted(d.glob("model-0*.safetensors"))[1].unlink()
    with pytest.raises(ConversionError, match=r"model\.safetensors\.index\.json.*missing"):
        hf_to_flax.load_hf_params(d, param_dtype="float32")


def test_unsupported_architecture_cli_exit_2(hf_dirs, tmp_path, capsys):
    d = shutil.copytree(hf_dirs["fp32_single_untied"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConversionError, match=rf"{d / 'config.json'}.*gpt2"):
        hf_to_flax.load_hf_params(d)
    assert hf_to_flax.main(["--hf", str(d), "--out", str(tmp_path / "ck")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "ck").exists()
    proc = subprocess.run([sys.executable, "-m", "convert.hf_to_flax", "--hf", str(d), "--out", str(tmp_path / "ck")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error: " in proc.stderr and "gpt2" in proc.stderr
    assert flax_to_hf.main(["--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("family,change,field", [
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "layer_types"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ("qwen3", {"architectures": ["Qwen2ForCausalLM"]}, "architecture"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("mixtral", {"num_local_experts": 8}, "block_sparse_moe.experts.4"),
])
def test_unsupported_family_options_are_refused(hf_dirs, tmp_path, family, change, field):
    """What the one model cannot express (sliding-window softmax layers, o_proj biases, other rope types) is an
    error naming the field, not a silently different model."""
    src = hf_dirs[{"qwen2": "qwen2_fp32_tied", "qwen3": "qwen3_fp32", "mixtral": "mixtral_fp32"}[family]]
    d = shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ConversionError, match=field):
        hf_to_flax.load_hf_params(d, param_dtype="float32")


@pytest.mark.parametrize("pre_existing", [False, True])
def test_failed_export_leaves_nothing(hf_dirs, tmp_path, monkeypatch, pre_existing):
    model = hf_to_flax.load_hf_params(hf_dirs["fp32_single_untied"], param_dtype="float32")
    out = tmp_path / "out"
    if pre_existing:
        out.mkdir()
    original, calls = safetensors_io._write_shard, []

    def failing(path, specs, metadata):
        if calls:
            raise OSError("disk full (simulated)")
        calls.append(path)
        original(path, specs, metadata)

    monkeypatch.setattr(safetensors_io, "_write_shard", failing)
    with pytest.raises(OSError, match="simulated"):
        flax_to_hf.export_hf(model, out, max_shard_size="40KB")
    # the first shard really was written (into the staging sibling) before the failure
    assert calls and calls[0].parent.parent == tmp_path and calls[0].parent.name.startswith(".out.staging-")
    assert (list(out.iterdir()) == []) if pre_existing else not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if pre_existing else [])  # no staging left behind
    monkeypatch.setattr(safetensors_io, "_write_shard", original)
    (out / "junk").parent.mkdir(exist_ok=True)
    (out / "junk").write_text("x")
    with pytest.raises(ConversionError, match="not an empty directory"):
        flax_to_hf.export_hf(model, out)


# ------------------------------------------------------------------------------------------ safetensors_io


def test_writer_output_is_read_by_official_package(tmp_path):
    rng = np.random.RandomState(0)
    arrays = {"a": rng.randn(7, 5).astype(np.float32), "b": rng.randn(300).astype(ml_dtypes.bfloat16),
              "c": rng.randn(3, 4).astype(np.float16), "d": np.arange(10, dtype=np.int64), "e": np.array(2.5)}
    specs = [safetensors_io.TensorSpec(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()]
    paths = safetensors_io.write_sharded(tmp_path, specs, max_shard_size=200)
    assert len(paths) == 4 and paths[-1].name == safetensors_io.INDEX_FILE  # 3 shards (b alone: 600 bytes) + index
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temporary leftovers
    got = {}
    for p in paths[:-1]:
        with safetensors.safe_open(str(p), framework="pt") as g:
            got.update({k: g.get_tensor(k) for k in g.keys()})
    for k, v in arrays.items():
        t = got[k].float().numpy() if k == "b" else got[k].numpy()
        np.testing.assert_array_equal(t, v.astype(np.float32) if k == "b" else v)
    files = SafetensorsDir(tmp_path)
    np.testing.assert_array_equal(files.read("a", (slice(2, 5), slice(1, 3))), arrays["a"][2:5, 1:3])
    assert safetensors_io.parse_size("5GB") == 5 * 10**9 and safetensors_io.parse_size("2KiB") == 2048


def test_writer_failure_removes_its_files(tmp_path):
    def boom() -> np.ndarray:
        raise RuntimeError("producer failed")

    specs = [safetensors_io.TensorSpec(f"t{i}", (100,), np.dtype(np.float32), lambda: np.zeros(100, np.float32)) for i in range(3)]
    specs.append(safetensors_io.TensorSpec("bad", (100,), np.dtype(np.float32), boom))
    (tmp_path / "keep.txt").write_text("untouched")
    with pytest.raises(RuntimeError, match="producer failed"):
        safetensors_io.write_sharded(tmp_path, specs, max_shard_size=800)  # shards 1-2 complete, shard 3 fails
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------------------ the real model


MEASURE = """
import resource, sys, time, jax
from convert.hf_to_flax import load_hf_params
t = time.perf_counter()
m = load_hf_params(sys.argv[1], param_dtype="float32")
jax.block_until_ready(m.embed[...])
print(f"{time.perf_counter() - t:.2f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
"""


def test_smollm2_round_trip_and_cost(smollm2_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(smollm2_dir)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds, rss = proc.stdout.split()
    size_mib = (smollm2_dir / "model.safetensors").stat().st_size / 2**20
    print(f"\nSmolLM2-135M ({size_mib:.0f} MiB fp32) load: {seconds} s, peak RSS of the loading process: {rss} MiB")
    t0 = time.perf_counter()
    model = hf_to_flax.load_hf_params(smollm2_dir, param_dtype="float32")
    flax_to_hf.export_hf(model, tmp_path / "out")
    print(f"in-process load + export: {time.perf_counter() - t0:.1f} s")
    a, b = SafetensorsDir(smollm2_dir), SafetensorsDir(tmp_path / "out")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert a.info(k).dtype == b.info(k).dtype and np.array_equal(a.view(k).view(np.uint8), b.view(k).view(np.uint8)), k


def test_base_cache_reads_the_weights_once_and_builds_each_variant(hf_dirs, monkeypatch):
    """evaluate builds the teacher, the linearized and the LoRA model from one read of the base weights."""
    d = hf_dirs["fp32_single_untied"]
    n_layers = hf_to_flax.read_config(d).num_layers
    variants = {"linearized": ModelOptions(layer_kinds=("lolcats",) * n_layers),
                "lora": ModelOptions(lora=LoraOptions(rank=2, alpha=4.0, targets=("q", "v")))}
    cache: dict = {}
    teacher = hf_to_flax.load_hf_params(d, param_dtype="float32", base_cache=cache)
    with monkeypatch.context() as m:
        m.setattr(hf_to_flax, "SafetensorsDir", lambda *a, **k: pytest.fail("read the weights again"))
        cached = {k: hf_to_flax.load_hf_params(d, param_dtype="float32", opts=o, base_cache=cache) for k, o in variants.items()}
    for name, opts in variants.items():
        assert cached[name].layers.wq[...] is teacher.layers.wq[...]  # shared, not copied
        fresh = hf_to_flax.load_hf_params(d, param_dtype="float32", opts=opts)
        a, b = nnx.to_flat_state(nnx.state(cached[name])), nnx.to_flat_state(nnx.state(fresh))
        assert [p for p, _ in a] == [p for p, _ in b]
        for (path, va), (_, vb) in zip(a, b):
            np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()), err_msg=f"{name} {path}")
