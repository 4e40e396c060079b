"""Export of linearized models: Hugging Face directory with our own PyTorch modeling code (parity with JAX, recurrent
generation), bit-exact re-import, the original LoLCATS checkpoint layout both ways, refusal of bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert import flax_to_hf, from_hf, from_lolcats, lolcats_format, to_hf
from convert.errors import ConversionError
from convert.safetensors_io import SafetensorsDir, SafetensorsFile, save_file
from lolcats_jax.model import Llama, LlamaConfig, LolcatsLayerOptions, LoraOptions, ModelOptions

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=16, rope_theta=10000.0, max_position_embeddings=256)
W, F, R, ALPHA = 4, 8, 4, 8.0
KINDS = ("lolcats", "softmax", "lolcats")  # layer 1 stays softmax
E, H, K, D = CFG.hidden_size, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
VARIANTS = {  # name -> LolcatsLayerOptions overrides
    "tk": {}, "sw": {"window": "sw"}, "tk_compat": {"compat": True}, "linear": {"form": "linear"},
    "bias_affine_exp": {"window": "sw", "feature_bias": True, "affine": True, "feature_map": "exp_dim"},
}


def make_model(variant: str = "tk", *, targets=("q", "k", "v", "o"), seed: int = 0) -> Llama:
    """A tiny linearized Llama with random weights, feature maps, window logits and nonzero LoRA B. Parameters are
    drawn with numpy into an abstractly built model (no XLA compilation)."""
    lo = LolcatsLayerOptions(window_size=W, feature_dim=F, backend="reference", **VARIANTS[variant])
    lora = LoraOptions(rank=R, alpha=ALPHA, targets=targets) if targets else None
    opts = ModelOptions(param_dtype="float32", compute_dtype="float32", remat=False, layer_kinds=KINDS, lolcats=lo,
                        lora=lora)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(CFG, opts, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path: tuple, shape: tuple[int, ...]) -> jax.Array:
        name = str(path[-1])
        if name.endswith("norm"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            scale = {"embed": 1.0, "lm_head": 0.2}.get(name, 0.5 if path[0] == "lolcats" else 0.1)
            value = scale * rng.standard_normal(shape)
        return jnp.asarray(value, jnp.float32)

    flat = [(p, v.replace(draw(p, v.get_value().shape))) for p, v in nnx.to_flat_state(abstract)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def with_options(model: Llama, **lolcats_overrides) -> Llama:
    """The same parameters under other lolcats options (e.g. compat=True)."""
    opts = dataclasses.replace(model.opts, lolcats=dataclasses.replace(model.opts.lolcats, **lolcats_overrides))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(model.cfg, opts, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


_FORWARDS: dict[int, tuple] = {}


def jax_logits(model: Llama, toks: np.ndarray, state: nnx.State | None = None) -> np.ndarray:
    """float32 logits of `model` (jitted once per model and shape); `state` replaces its parameters (same tree)."""
    if id(model) not in _FORWARDS:
        graphdef, own = nnx.split(model)
        _FORWARDS[id(model)] = (jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)), own, model)
    fn, own, _ = _FORWARDS[id(model)]
    return np.asarray(fn(own if state is None else state, jnp.asarray(toks)))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def tokens(batch: int, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (batch, length))


def write_tokenizer(path: Path) -> Path:
    """A word-level tokenizer over the tiny vocabulary (w0 … w127)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(CFG.vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1").save_pretrained(str(path))
    return path


def load_hf(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, local_files_only=True,
                                                dtype=dtype).eval()


def hf_logits(hf, toks: np.ndarray, **kw) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(toks), **kw).logits.float().numpy()


def file_bytes(model_dir: Path) -> dict[str, tuple[str, bytes]]:
    files = SafetensorsDir(model_dir)
    return {k: (files.info(k).dtype, files.file_of(k).read(k).tobytes()) for k in files.keys()}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny torch models run ~50x faster on one thread than on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Llama, Path]]:
    root = tmp_path_factory.mktemp("export")
    tok_dir = write_tokenizer(root / "tok")
    out = {}
    for variant in VARIANTS:
        model = make_model(variant)
        to_hf.export_linearized(model, tok_dir, root / variant, max_shard_size="40KB")
        out[variant] = (model, root / variant)
    return out


# ---------------------------------------------------------------------------------------------- HF format

SEQ = tokens(2, 21)  # parity input; compat masks depend on the length, the other forms are causal (prefixes)
LENGTHS = (3, 11, 13, 21)  # ≤ W, and lengths that are not multiples of W beyond 2W


def reference_logits(model: Llama, length: int) -> np.ndarray:
    """JAX logits of SEQ[:, :length] (from the full sequence unless compat masks make the length matter)."""
    if model.opts.lolcats.compat:
        return jax_logits(model, SEQ[:, :length])
    return jax_logits(model, SEQ)[:, :length]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_logits_match_jax(exported, variant):
    model, path = exported[variant]
    hf = load_hf(path)
    assert type(hf).__name__ == "LolcatsLlamaForCausalLM"
    for length in (3, 13) if variant == "tk_compat" else LENGTHS:
        err = rel_err(hf_logits(hf, SEQ[:, :length], use_cache=False), reference_logits(model, length))
        assert err <= 1e-4, (variant, length, err)


def test_attention_variants_differ(exported):
    """Guards the parity tests: window kind, compat masks and the linear form all change these models' logits."""
    logits = {v: reference_logits(exported[v][0], 13) for v in ("tk", "sw", "tk_compat", "linear")}
    names = list(logits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert rel_err(logits[a], logits[b]) > 1e-3, (a, b)


def test_hf_directory_contents(exported):
    model, path = exported["bias_affine_exp"]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "lolcats_llama"
    assert config["auto_map"] == {"AutoConfig": "configuration_lolcats.LolcatsLlamaConfig",
                                  "AutoModel": "modeling_lolcats.LolcatsLlamaModel",
                                  "AutoModelForCausalLM": "modeling_lolcats.LolcatsLlamaForCausalLM"}
    lo = config["lolcats"]
    assert (lo["window"], lo["window_size"], lo["feature_dim"], lo["feature_bias"], lo["affine"]) == ("sw", W, F, True, True)
    assert lo["softmax_layers"] == [1] and lo["lora"] == {"merged": True, "rank": R, "alpha": ALPHA,
                                                           "targets": ["q", "k", "v", "o"]}
    for name in ("modeling_lolcats.py", "configuration_lolcats.py", "tokenizer.json", "model.safetensors.index.json"):
        assert (path / name).is_file(), name
    files = SafetensorsDir(path)
    assert len(files.file_names) > 1  # sharded
    extra = {k: files.info(k).shape for k in files.keys() if "feature_map" in k or "window_factors" in k}
    expected = {}
    for i in (0, 2):
        pre = f"model.layers.{i}.self_attn."
        expected.update({pre + "feature_map_q.weight": (H, D, F), pre + "feature_map_k.weight": (H, D, F),
                         pre + "feature_map_q.bias": (H,), pre + "feature_map_k.bias": (H,), pre + "window_factors": (H,)})
    assert extra == expected
    theta = files.file_of("model.layers.2.self_attn.window_factors").read("model.layers.2.self_attn.window_factors")
    np.testing.assert_array_equal(theta, np.asarray(model.lolcats.window_logit[...][1]))
    from transformers import AutoTokenizer  # remote-code directories need trust_remote_code for the tokenizer too

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True, local_files_only=True)
    assert tok("w5 w7")["input_ids"] == [5, 7]


def test_merged_lora_equals_base_plus_lolcats_format_adapters(exported, tmp_path):
    """q_proj in the HF export = base q_proj + (α/r)·B A with B, A read from the LoLCATS-layout export: checks the
    merge and both layouts against each other."""
    model, path = exported["tk"]
    to_hf.export_linearized(model, None, tmp_path / "lc", format="lolcats")
    adapters = SafetensorsFile(tmp_path / "lc" / lolcats_format.CHECKPOINT_FILE)
    files = SafetensorsDir(path)
    for i in range(CFG.num_layers):
        for t, ours in (("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo")):
            a = adapters.read(lolcats_format.lora_key(i, t, "A")).astype(np.float64)
            b = adapters.read(lolcats_format.lora_key(i, t, "B")).astype(np.float64)
            w = np.asarray(getattr(model.layers, ours)[...][i], np.float64)
            base = w.reshape(E, -1).T if t != "o" else w.reshape(-1, E).T  # HF (out, in)
            name = f"model.layers.{i}.self_attn.{t}_proj.weight"
            merged = files.file_of(name).read(name)
            np.testing.assert_allclose(merged, base + ALPHA / R * (b @ a), rtol=0, atol=1e-6)
            assert np.abs(merged - base).max() > 1e-4


@pytest.mark.parametrize("variant", ["tk", "sw"])
def test_generate_with_cache_matches_jax_greedy(exported, variant):
    model, path = exported[variant]
    hf = load_hf(path)
    prompts, steps = tokens(2, 7, seed=5), 14  # decoding crosses several W-blocks; 7 + 14 = SEQ's length
    kw = dict(max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True,
              pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = hf.generate(torch.tensor(prompts), use_cache=True, **kw)
        uncached = hf.generate(torch.tensor(prompts), use_cache=False, **kw)
    seqs = cached.sequences.numpy()
    np.testing.assert_array_equal(seqs, uncached.sequences.numpy())
    assert rel_err(torch.stack(cached.logits).numpy(), torch.stack(uncached.logits).numpy()) <= 1e-5
    # greedy decoding by the JAX model picks every generated token: argmax of its logits along the sequence
    ref = jax_logits(model, seqs)
    np.testing.assert_array_equal(ref[:, 6:-1].argmax(-1), seqs[:, 7:])
    import kernels.lolcats as kl

    if hasattr(kl, "decode_step") and hasattr(kl, "prefill_state"):  # the JAX recurrent decoder, once it exists
        from lolcats_jax.generation import Generator

        assert Generator(model).generate([list(p) for p in prompts], steps) == seqs[:, 7:].tolist()


@pytest.mark.parametrize("variant", ["tk", "sw", "linear", "bias_affine_exp"])
def test_recurrent_decode_equals_parallel(exported, variant):
    """Prefill, a multi-token chunk on the cache, then single tokens == one parallel forward (every position)."""
    from transformers import DynamicCache

    _, path = exported[variant]
    hf = load_hf(path)
    seq = torch.tensor(tokens(2, 21, seed=3))
    with torch.no_grad():
        full = hf(seq, use_cache=False).logits
        cache = DynamicCache(config=hf.config)
        parts, pos = [], 0
        for n in (5, 6) + (1,) * 10:
            out = hf(seq[:, pos:pos + n], cache=cache, use_cache=True)
            cache, pos = out.cache, pos + n
            parts.append(out.logits)
    assert rel_err(torch.cat(parts, 1).numpy(), full.numpy()) <= 1e-5
    held = max(layer.keys.shape[-2] for layer in cache.layers if type(layer).__name__ == "LolcatsCacheLayer")
    assert held <= {"tk": 2 * W, "sw": W, "linear": 0, "bias_affine_exp": W}[variant]


def test_bfloat16_export(exported, tmp_path):
    model, _ = exported["tk"]
    to_hf.export_linearized(model, None, tmp_path / "bf16", dtype="bfloat16")
    files = SafetensorsDir(tmp_path / "bf16")
    assert files.info("model.layers.0.self_attn.q_proj.weight").dtype == "BF16"
    assert files.info("model.layers.0.self_attn.feature_map_q.weight").dtype == "F32"
    hf = load_hf(tmp_path / "bf16", dtype=torch.bfloat16)
    assert hf.model.layers[0].self_attn.feature_map_q.weight.dtype == torch.float32
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert rel_err(hf_logits(hf, SEQ), reference_logits(model, 21)) <= 5e-2


# ------------------------------------------------------------------------------------------------ re-import


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_import_round_trip_is_bit_exact(exported, tmp_path, dtype):
    model, _ = exported["bias_affine_exp"]
    first, second = tmp_path / "first", tmp_path / "second"
    to_hf.export_linearized(model, None, first, dtype=dtype)
    back = from_hf.load_linearized(first)
    assert back.opts.lora is None and not hasattr(back, "lora")
    assert back.opts.lolcats.feature_bias and back.kinds == KINDS
    to_hf.export_linearized(back, None, second)
    assert file_bytes(first) == file_bytes(second)
    configs = [json.loads((d / "config.json").read_text()) for d in (first, second)]
    assert configs[0]["lolcats"].pop("lora")["merged"] and configs[1]["lolcats"].pop("lora") is None
    assert configs[0] == configs[1]
    if dtype is None:  # same logits (up to the rounding of the merge)
        assert rel_err(jax_logits(back, SEQ), reference_logits(model, 21)) <= 1e-5


def test_import_refuses_bad_hf_directories(exported, tmp_path):
    _, path = exported["tk"]
    with pytest.raises(ConversionError, match="lolcats_llama"):
        from_hf.load_linearized(_copy_dir(path, tmp_path / "plain", edit_config=lambda c: c.update(model_type="llama")))
    bad = _copy_dir(path, tmp_path / "wrong_f", edit_config=lambda c: c["lolcats"].update(feature_dim=F + 1))
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.feature_map_q\.weight.*shape"):
        from_hf.load_linearized(bad)
    bad = _copy_dir(path, tmp_path / "all_lin", edit_config=lambda c: c["lolcats"].update(layer_kinds=["lolcats"] * 3))
    with pytest.raises(ConversionError, match=r"missing tensor.*model\.layers\.1\.self_attn\.feature_map_q\.weight"):
        from_hf.load_linearized(bad)


def _copy_dir(src: Path, dst: Path, edit_config) -> Path:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# ------------------------------------------------------------------------------------------ LoLCATS layout


def test_lolcats_format_has_exactly_the_documented_keys(exported, tmp_path):
    model, _ = exported["tk"]
    to_hf.export_linearized(model, None, tmp_path / "lc", format="lolcats")
    f = SafetensorsFile(tmp_path / "lc" / lolcats_format.CHECKPOINT_FILE)
    got = {k: f.info(k).shape for k in f.keys()}
    P = "base_model.model.model.layers.{}.self_attn."
    expected = {}
    for i in (0, 2):
        expected[P.format(i) + "feature_map_q.mlp.layer"] = (4, 16, 8)
        expected[P.format(i) + "feature_map_k.mlp.layer"] = (4, 16, 8)
        expected[P.format(i) + "window_factors"] = (1, 4, 1, 1)
    for i in range(3):
        for t, a_shape, b_shape in (("q", (4, 64), (64, 4)), ("k", (4, 64), (32, 4)), ("v", (4, 64), (32, 4)),
                                    ("o", (4, 64), (64, 4))):
            expected[P.format(i) + f"{t}_proj.lora_A.default.weight"] = a_shape
            expected[P.format(i) + f"{t}_proj.lora_B.default.weight"] = b_shape
    assert got == expected
    np.testing.assert_array_equal(f.read(P.format(2) + "window_factors").reshape(-1), model.lolcats.window_logit[...][1])
    np.testing.assert_array_equal(f.read(P.format(0) + "feature_map_k.mlp.layer"), model.lolcats.fmap_k[...][0])
    np.testing.assert_array_equal(f.read(P.format(1) + "q_proj.lora_A.default.weight"), np.asarray(model.lora.q_a[...][1]).T)
    described = json.loads((tmp_path / "lc" / lolcats_format.CONFIG_FILE).read_text())
    assert described["lora"] == {"rank": R, "alpha": ALPHA, "targets": ["q", "k", "v", "o"]}


def test_lolcats_format_refuses_mlp_lora(tmp_path):
    model = make_model("tk", targets=("q", "gate"))
    with pytest.raises(ConversionError, match="gate"):
        to_hf.export_linearized(model, None, tmp_path / "lc", format="lolcats")
    assert not (tmp_path / "lc").exists()


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory):
    """Base HF directory + LoLCATS-layout export of the tk model, imported as a run directory; and the source model
    in compat mode (same parameters)."""
    root = tmp_path_factory.mktemp("import")
    model, _ = exported["tk"]
    base = root / "base"
    flax_to_hf.export_hf(model, base)  # base weights only: no LoRA, no feature maps
    write_tokenizer(base)
    to_hf.export_linearized(model, None, root / "lc", format="lolcats")
    ckpt = root / "lc" / lolcats_format.CHECKPOINT_FILE
    run = from_lolcats.import_lolcats(base, [ckpt], root / "run", window="tk", window_size=W, lora_alpha=ALPHA)
    return exported["tk_compat"][0], base, ckpt, run


@pytest.fixture(scope="module")
def loaded_run(imported):
    """(model, tokenizer) of the imported run directory, loaded once (building the model compiles its init)."""
    from lolcats_jax.run_model import load_run_model

    return load_run_model(imported[3])


def test_import_lolcats_matches_compat_source(imported, loaded_run):
    """Export --format lolcats → import → the run's model = the source in compat mode: same options (but the
    backend), and the same logits."""
    compat_source = imported[0]
    loaded, _tokenizer = loaded_run
    assert dataclasses.replace(loaded.opts.lolcats, backend="reference") == compat_source.opts.lolcats
    assert loaded.kinds == KINDS and loaded.opts.lora == compat_source.opts.lora
    got = jax_logits(compat_source, SEQ[:, :13], state=jax.tree.map(np.asarray, nnx.state(loaded)))
    np.testing.assert_allclose(got, reference_logits(compat_source, 13), rtol=0, atol=1e-6)


def test_import_lolcats_pt_files(imported, tmp_path, capsys):
    """The released layout: a distill .pt (`model.` prefix, `model_state_dict` wrapper, `window_factor` alias) and a
    LoRA .pt (PEFT names), alpha defaulting to 2·r, give the same run as the safetensors file."""
    from lolcats_jax.train.ckpt import load_params

    _, base, ckpt, st_run = imported
    with SafetensorsFile(ckpt) as f:
        tensors = {k: torch.tensor(f.read(k)) for k in f.keys()}
    distill = {k.replace("base_model.model.model.", "model."): v for k, v in tensors.items() if "lora" not in k}
    distill = {k.replace("window_factors", "window_factor") if ".2." in k else k: v for k, v in distill.items()}
    assert "model.layers.2.self_attn.window_factor" in distill
    lora = {k: v for k, v in tensors.items() if "lora" in k}
    torch.save({"model_state_dict": distill, "step": 1}, tmp_path / "d.pt")
    torch.save(lora, tmp_path / "ft.pt")
    run = from_lolcats.import_lolcats(base, [tmp_path / "d.pt", tmp_path / "ft.pt"], tmp_path / "run",
                                      window="tk", window_size=W)
    assert "alpha" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == (st_run / "config.yaml").read_text().replace(str(st_run), str(run))
    parsed = lolcats_format.parse_checkpoint(lolcats_format.read_checkpoint_file(ckpt), CFG)
    expected = {"distill": {"lolcats/fmap_q": parsed.fmap_q, "lolcats/fmap_k": parsed.fmap_k,
                            "lolcats/window_logit": parsed.window_logit},
                "finetune": {f"lora/{k}": v for k, v in parsed.lora.items()}}
    for stage, want in expected.items():
        got, _meta = load_params(run / stage / "final", {k: jnp.asarray(v) for k, v in want.items()})
        for k, v in want.items():
            np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=f"{stage} {k}")


def test_run_directory_exports_to_hf(imported, loaded_run, tmp_path, monkeypatch):
    """`python -m convert.to_hf --run RUNDIR` (the imported run) → HF logits == the compat JAX source."""
    import lolcats_jax.run_model

    compat_source, _, _, run = imported
    monkeypatch.setattr(lolcats_jax.run_model, "load_run_model", lambda run_dir: loaded_run)  # loaded once above
    assert to_hf.main(["--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["lolcats"]["compat"] is True
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    got = hf_logits(load_hf(tmp_path / "hf"), SEQ[:, :13], use_cache=False)
    assert rel_err(got, reference_logits(compat_source, 13)) <= 1e-4
    monkeypatch.undo()
    assert to_hf.main(["--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == ConversionError.exit_code


def test_lolcats_import_refuses_bad_checkpoints(imported, tmp_path):
    _, base, ckpt, _ = imported
    with SafetensorsFile(ckpt) as f:
        good = {k: f.read(k) for k in f.keys()}
    P = "base_model.model.model.layers.{}.self_attn."
    cases = {
        "missing": ({k: v for k, v in good.items() if k != P.format(2) + "window_factors"},
                    r"missing key layers\.2\.self_attn\.window_factors"),
        "shape": ({**good, P.format(0) + "feature_map_k.mlp.layer": np.zeros((4, 16, 9), np.float32)},
                  r"feature_map_k\.mlp\.layer.*shape \[4, 16, 9\]"),
        "lora_shape": ({**good, P.format(1) + "v_proj.lora_B.default.weight": np.zeros((64, 4), np.float32)},
                       r"v_proj\.lora_B.*shape \[64, 4\]"),
        "mlp_target": ({**good, "base_model.model.model.layers.0.mlp.gate_proj.lora_A.default.weight":
                        np.zeros((4, 64), np.float32)}, r"mlp\.gate_proj\.lora_A.*unsupported target"),
        "unknown": ({**good, "base_model.model.lm_head.weight": np.zeros((2, 2), np.float32)}, r"lm_head"),
        "only_lora": ({k: v for k, v in good.items() if "lora" in k}, r"no feature maps"),
        "lonely_A": ({k: v for k, v in good.items() if k != P.format(0) + "o_proj.lora_B.default.weight"},
                     r"missing key layers\.0\.self_attn\.o_proj\.lora_B"),
    }
    for name, (tensors, pattern) in cases.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(ConversionError, match=pattern):
            from_lolcats.import_lolcats(base, [tmp_path / f"{name}.safetensors"], tmp_path / f"run_{name}", window_size=W)
        assert not (tmp_path / f"run_{name}").exists(), name
    assert from_lolcats.main(["--base", str(base), "--ckpt", str(tmp_path / "missing.safetensors"),
                              "--out", str(tmp_path / "cli")]) == ConversionError.exit_code
