"""Typed, frozen run configuration loaded from YAML, with dotted command-line overrides.

    cfg = load_config("configs/smollm2_demo.yaml", overrides=["distill.optim.lr=0.005", "mesh.fsdp=2"])

Unknown keys and values of the wrong type are errors (`ConfigError`) that name the key, the file and the valid
keys; command-line entry points turn them into exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Mapping, Sequence, Union

import yaml

if typing.TYPE_CHECKING:  # jax-free at run time: the config is checked before JAX is imported
    from lolcats_jax.sharding import MeshShape


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


# ------------------------------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = "artifacts/smollm2-135m"  # Hugging Face Llama directory (config.json + safetensors)
    checkpoint: str | None = None  # optional Orbax checkpoint of the converted base weights (faster than HF)
    architecture: str | None = None  # a config.json describing the model, for planning without the weights
    param_dtype: str = "bfloat16"
    compute_dtype: str = "float32"
    remat: bool = True  # rematerialise each layer in LoRA / finetune backward passes (attention transfer needs none:
    # each layer's gradient is taken inside the layer, so its activations are never kept for a backward pass)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    kind: str = "lolcats"  # lolcats | softmax (keep the model as is)
    form: str = "hybrid"  # hybrid | linear
    window: str = "tk"  # tk (terraced, start-aligned blocks) | sw (sliding window)
    window_size: int = 64
    feature_map: str = "softmax_dim"  # softmax_dim | exp_dim | relu | pos_elu
    fullspace: bool = True
    feature_dim: int = 64
    feature_init: str = "identity"  # identity (zero_init of the released runs) | kaiming
    feature_bias: bool = False
    eps: float = 1e-12
    init_window_factor: float = -2.1972245773362196  # logit(0.1)
    affine: bool = False
    compat: bool = False  # original end-aligned terraced masks (reproducing released checkpoints only)
    backend: str = "auto"  # auto | reference | chunked | pallas | triton
    chunk_size: int = 64
    softmax_layers: tuple[int, ...] = ()  # layers kept as softmax attention


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: the remaining devices
    tensor: int = 1
    expert: int = 1  # expert parallelism of mixture-of-experts MLPs (a data axis everywhere else)
    devices: int | None = None  # the device count the config is written for (used by `python -m lolcats_jax.plan`)
    device_memory_gb: float = 80.0  # per-device memory the plan checks against

    def shape(self) -> MeshShape:
        from lolcats_jax.sharding import MeshShape

        return MeshShape(self.data, self.fsdp, self.tensor, self.expert)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    format: str = "alpaca"  # alpaca (instruction/input/output JSON[L]) | text (txt files or JSONL "text") | arrow
    train: tuple[str, ...] = ()  # files, directories or globs
    validation: tuple[str, ...] = ()  # empty: split `val_size` chunks off the training data
    template: str = "alpaca"  # alpaca | chat (the tokenizer's chat template); alpaca format only
    chunk_size: int = 1024
    val_size: int = 16  # number of packed chunks held out when `validation` is empty
    max_train_chunks: int | None = None
    seed: int = 0
    tokenizer: str | None = None  # defaults to model.path


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-2
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_accum: int = 1
    clip_norm: float | None = None
    schedule: str = "plateau"  # constant | cosine | plateau
    warmup_steps: int = 0
    min_lr: float = 1e-5
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    plateau_threshold: float = 1e-4


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    data: DataConfig = DataConfig()
    optim: OptimizerConfig = OptimizerConfig()
    batch_size: int = 1
    max_steps: int = 100
    epochs: int | None = None  # when set, max_steps is derived from the dataset size
    eval_every: int = 20
    eval_batches: int | None = None  # None: the whole validation split
    mse_factor: float = 1000.0
    xent_factor: float = 0.0
    checkpoint_every: int = 20
    log_every: int = 1
    snapshot_every: int | None = None  # also keep the trainable parameters every N steps (<stage>/snapshots/<step>)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    train_attention: bool = False  # also train feature maps and window factors


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    data: DataConfig = DataConfig()
    optim: OptimizerConfig = OptimizerConfig(lr=1e-4)
    lora: LoraConfig = LoraConfig()
    batch_size: int = 1
    max_steps: int = 100
    epochs: int | None = None
    eval_every: int = 20
    eval_batches: int | None = None
    checkpoint_every: int = 20
    log_every: int = 1
    snapshot_every: int | None = None
    # loss = xent_factor × next-token cross-entropy + kl_factor × KL(teacher ‖ student) of the next-token
    # distributions, the teacher being the same base weights with softmax attention and no LoRA (kl_factor > 0 adds
    # one teacher forward per step)
    xent_factor: float = 1.0
    kl_factor: float = 0.0


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    size: int = 5  # layers per block (k)
    index: str = "all"  # "all", a block index, a range "0-6" or a comma list "0-3,7"
    store: str | None = None  # where collected block inputs live (default: <run.dir>/block_inputs)
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    ignore_disk_check: bool = False
    collect_batch_size: int | None = None  # sequences per collect batch (default: one per data × fsdp × expert device)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = ()
    limit: int | None = None  # documents per task
    mmlu_limit: int | None = None  # questions per MMLU subject (57 subjects); default: `limit`
    mmlu_subjects: int | None = None  # score only this many MMLU subjects, evenly spaced (CPU subsets); None: all 57
    mmlu_shots: int = 5  # solved dev examples before each MMLU question (the standard is 5)
    batch_size: int = 8
    perplexity: tuple[str, ...] = ()  # held-out text files
    task_models: tuple[str, ...] = ("teacher", "distill", "finetune")  # which models the benchmark tasks score
    max_perplexity_tokens: int = 8192
    perplexity_chunk_len: int | None = None  # tokens per perplexity window; None: distill.data.chunk_size
    attention_mse_batches: int = 6  # distill validation batches for the attention MSE of linearized models (0: off)
    compare_runs: tuple[str, ...] = ()  # other run dirs whose evaluate results the report puts beside this run's
    long_context: tuple[str, ...] = ()  # held-out text files for the loss by position over long windows (eval.position_loss)
    long_context_length: int = 4096  # positions per window (≤ the model's context)
    long_context_windows: int = 4  # whole windows scored per model, from the start of the files' text


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    prompt: str = "Once upon a time, there was a little girl who"
    max_new_tokens: int = 32
    chat: bool = False


@dataclasses.dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    stages: tuple[str, ...] = ("distill", "finetune", "evaluate", "export")
    coordinator: str | None = None  # host:port for jax.distributed (auto-detected under SLURM)
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    attention: AttentionConfig = AttentionConfig()
    mesh: MeshConfig = MeshConfig()
    distill: DistillConfig = DistillConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    block: BlockConfig = BlockConfig()
    evaluate: EvalConfig = EvalConfig()
    generate: GenerateConfig = GenerateConfig()


# --------------------------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Checks/converts a YAML value to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping (section {tp.__name__}), got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-2" as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported annotation {tp}")


def _build(cls: type, raw: Mapping[str, Any], where: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _convert(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _parse_override(item: str, source: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"{source}: override {item!r} must look like key.sub=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    node: Any = value
    for part in reversed(key.strip().split(".")):
        if not part:
            raise ConfigError(f"{source}: override {item!r} has an empty key part")
        node = {part: node}
    return node


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Loads `path` (YAML; may be None for defaults), applies `overrides`, validates and returns a Config."""
    raw: dict = {}
    where = "<defaults>"
    if path is not None:
        where = os.fspath(path)
        if not os.path.isfile(where):
            raise ConfigError(f"{where}: config file not found")
        with open(where) as f:
            try:
                loaded = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ConfigError(f"{where}: not valid YAML ({e})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{where}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = dict(loaded)
    try:
        cfg = _build(Config, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if overrides:
        validate(cfg, where)  # the file's own mistakes are named as the file's
        for item in overrides:  # then each override on its own, so a typo is blamed on the command line
            raw = _merge(raw, _parse_override(item, "command line"))
            try:
                cfg = _build(Config, raw, "")
            except ConfigError as e:
                raise ConfigError(f"command-line override {item!r}: {e}") from None
        where = f"{where} with the command-line overrides"
    validate(cfg, where)
    return cfg


_CHOICES = {
    ("attention", "kind"): ("lolcats", "softmax"),
    ("attention", "form"): ("hybrid", "linear"),
    ("attention", "window"): ("tk", "sw"),
    ("attention", "feature_map"): ("softmax_dim", "exp_dim", "relu", "pos_elu"),
    ("attention", "feature_init"): ("identity", "kaiming"),
    ("attention", "backend"): ("auto", "reference", "chunked", "pallas", "triton"),
    ("model", "param_dtype"): ("float32", "bfloat16", "float16"),
    ("model", "compute_dtype"): ("float32", "bfloat16", "float16"),
}


def perplexity_chunk_len(cfg: Config) -> int:
    """Tokens per held-out perplexity window: evaluate.perplexity_chunk_len, else the distill sequence length."""
    return cfg.evaluate.perplexity_chunk_len or cfg.distill.data.chunk_size


def validate(cfg: Config, where: str = "<config>") -> None:
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{where}: {section}.{key}={value!r} is not one of {list(choices)}")
    known_stages = ("collect", "distill", "distill_block", "stitch", "finetune", "evaluate", "export")
    for stage in cfg.run.stages:
        if stage not in known_stages:
            raise ConfigError(f"{where}: run.stages contains {stage!r}; valid stages: {list(known_stages)}")
    for name in ("distill", "finetune"):
        sec = getattr(cfg, name)
        if sec.data.format not in ("alpaca", "text", "arrow"):
            raise ConfigError(f"{where}: {name}.data.format={sec.data.format!r} is not one of ['alpaca', 'text', 'arrow']")
        if sec.optim.schedule not in ("constant", "cosine", "plateau"):
            raise ConfigError(f"{where}: {name}.optim.schedule={sec.optim.schedule!r} is not one of ['constant', 'cosine', 'plateau']")
        if sec.data.template not in ("alpaca", "chat"):
            raise ConfigError(f"{where}: {name}.data.template={sec.data.template!r} is not one of ['alpaca', 'chat']")
        for key in ("eval_every", "checkpoint_every", "log_every", "snapshot_every"):
            value = getattr(sec, key)
            if value is not None and value < 1:
                raise ConfigError(f"{where}: {name}.{key}={value} must be a positive number of steps")
    f = cfg.finetune
    if f.xent_factor < 0 or f.kl_factor < 0 or f.xent_factor + f.kl_factor <= 0:
        raise ConfigError(f"{where}: finetune.xent_factor={f.xent_factor} and finetune.kl_factor={f.kl_factor} must be "
                          "≥ 0 and not both 0")
    if not 0 <= cfg.finetune.lora.dropout < 1:
        raise ConfigError(f"{where}: finetune.lora.dropout={cfg.finetune.lora.dropout} must be a probability in [0, 1)")
    if cfg.attention.window_size <= 0:
        raise ConfigError(f"{where}: attention.window_size must be positive, got {cfg.attention.window_size}")
    if cfg.evaluate.perplexity_chunk_len is not None and cfg.evaluate.perplexity_chunk_len < 1:
        raise ConfigError(f"{where}: evaluate.perplexity_chunk_len={cfg.evaluate.perplexity_chunk_len} must be ≥ 1 (or null)")
    for key in ("long_context_length", "long_context_windows"):
        if getattr(cfg.evaluate, key) < 1:
            raise ConfigError(f"{where}: evaluate.{key}={getattr(cfg.evaluate, key)} must be ≥ 1")


def _abs(p: str | None) -> str | None:
    return p if not p else os.path.abspath(os.path.expanduser(p))


def _abs_data(d: DataConfig) -> DataConfig:
    return dataclasses.replace(d, train=tuple(_abs(p) for p in d.train), validation=tuple(_abs(p) for p in d.validation),
                               tokenizer=_abs(d.tokenizer))


def absolute_paths(cfg: Config) -> Config:
    """`cfg` with every file-system path made absolute (relative ones are relative to the working directory)."""
    r = dataclasses.replace
    return r(
        cfg,
        run=r(cfg.run, dir=_abs(cfg.run.dir)),
        model=r(cfg.model, path=_abs(cfg.model.path), checkpoint=_abs(cfg.model.checkpoint),
                architecture=_abs(cfg.model.architecture)),
        distill=r(cfg.distill, data=_abs_data(cfg.distill.data)),
        finetune=r(cfg.finetune, data=_abs_data(cfg.finetune.data)),
        block=r(cfg.block, store=_abs(cfg.block.store)),
        evaluate=r(cfg.evaluate, perplexity=tuple(_abs(p) for p in cfg.evaluate.perplexity),
                   long_context=tuple(_abs(p) for p in cfg.evaluate.long_context),
                   compare_runs=tuple(_abs(p) for p in cfg.evaluate.compare_runs)),
    )


def to_dict(cfg: Any) -> Any:
    """Plain YAML-able dict of a config (tuples as lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Writes the resolved config atomically."""
    from lolcats_jax.fsio import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
