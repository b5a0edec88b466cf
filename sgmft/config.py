"""One typed configuration schema for train, tune, evaluate and serve, and the backbone
presets it may name (their architectures, input sizes and head widths).

Configs are dataclasses. YAML files and ``--set section.key=value`` overrides are
checked against the dataclass types: an unknown key or a value of the wrong type
raises :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# --- backbone presets: every fact about them, torch-free ---------------------------------
# Preprocessing, the models, the HTTP API and the config's checks read these; none of them
# needs torch or cn_clip to know an image size, the pad token or which presets exist.

PAD_TOKEN_ID = 0
"""Token id of padding in the cn_clip vocabulary; positions holding it are masked."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Chinese-CLIP's pixel normalisation, applied on the model's device to uint8 pixels."""


@dataclass(frozen=True)
class ReleasedPreset:
    """A released cn_clip checkpoint: its architecture JSONs, input size and file name."""

    vision_config: str
    text_config: str
    image_size: int
    file_name: str


RELEASED: dict[str, ReleasedPreset] = {
    "ViT-B-16": ReleasedPreset("ViT-B-16", "RoBERTa-wwm-ext-base-chinese", 224, "clip_cn_vit-b-16.pt"),
    "ViT-L-14": ReleasedPreset("ViT-L-14", "RoBERTa-wwm-ext-base-chinese", 224, "clip_cn_vit-l-14.pt"),
    "ViT-L-14-336": ReleasedPreset("ViT-L-14-336", "RoBERTa-wwm-ext-base-chinese", 336, "clip_cn_vit-l-14-336.pt"),
    "ViT-H-14": ReleasedPreset("ViT-H-14", "RoBERTa-wwm-ext-large-chinese", 224, "clip_cn_vit-h-14.pt"),
    "RN50": ReleasedPreset("RN50", "RBT3-chinese", 224, "clip_cn_rn50.pt"),
}


def _text_arch(hidden: int, layers: int, heads: int, dropout: float) -> dict[str, Any]:
    return {
        "vocab_size": 21128,  # the cn_clip vocabulary
        "text_attention_probs_dropout_prob": dropout,
        "text_hidden_act": "gelu",
        "text_hidden_dropout_prob": dropout,
        "text_hidden_size": hidden,
        "text_initializer_range": 0.02,
        "text_intermediate_size": hidden * 4,
        "text_max_position_embeddings": 512,
        "text_num_attention_heads": heads,
        "text_num_hidden_layers": layers,
        "text_type_vocab_size": 2,
    }


CUSTOM: dict[str, dict[str, Any]] = {
    # Random-init presets for CPU: `tiny` for tests and the demo, `small` for benchmarks.
    "tiny": {
        "embed_dim": 64, "image_resolution": 32, "vision_layers": 2, "vision_width": 64,
        "vision_patch_size": 8, "vision_head_width": 32, **_text_arch(64, 2, 2, 0.0),
    },
    "small": {
        "embed_dim": 256, "image_resolution": 112, "vision_layers": 4, "vision_width": 256,
        "vision_patch_size": 16, "vision_head_width": 64, **_text_arch(256, 4, 4, 0.1),
    },
}


HEAD_WIDTH: dict[str, tuple[int, int]] = {
    # SG-MFT head width and attention heads per backbone preset (D=512, 8 heads at ViT-B-16).
    "tiny": (64, 4), "small": (256, 4), "ViT-B-16": (512, 8), "ViT-L-14": (768, 12),
    "ViT-L-14-336": (768, 12), "ViT-H-14": (1024, 16), "RN50": (512, 8),
}
BACKBONE_PRESETS: tuple[str, ...] = (*CUSTOM, *RELEASED)
"""The presets a config may name: the random-init ones, then the released architectures."""
if set(HEAD_WIDTH) != set(BACKBONE_PRESETS):
    raise ImportError(f"sgmft.config: presets {sorted(set(HEAD_WIDTH) ^ set(BACKBONE_PRESETS))} lack a head width or an architecture")


def check_preset(preset: str) -> str:
    if preset not in HEAD_WIDTH:
        raise ValueError(f"unknown backbone preset {preset!r}; known: {list(BACKBONE_PRESETS)}")
    return preset


def image_size_of(preset: str) -> int:
    """The square input resolution of a preset's vision tower."""
    check_preset(preset)
    if preset in CUSTOM:
        return int(CUSTOM[preset]["image_resolution"])
    return RELEASED[preset].image_size


PREDICT_BATCH_SIZE = 64
"""Posts per forward when a model runs over a dataset: batch prediction, evaluation, feature caching."""

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration value is unknown, missing or of the wrong type."""


def choices(section: type, name: str) -> tuple[Any, ...]:
    """The values a ``Literal`` field of a config section allows, e.g. for a command line's choices."""
    return typing.get_args(typing.get_type_hints(section)[name])


@dataclass
class BackboneConfig:
    """Which Chinese-CLIP to use and how much of it trains."""

    preset: str = "tiny"
    """One of BACKBONE_PRESETS. ``tiny`` and ``small`` are random-init CPU-sized models."""
    implementation: Literal["cn_clip", "hf"] = "cn_clip"
    """``cn_clip`` builds the package's own CLIP; ``hf`` uses transformers' ChineseCLIPModel."""
    checkpoint: str | None = None
    """Released weights: a cn_clip ``.pt`` file, or a Hugging Face model directory for ``hf``."""
    download_root: str | None = None
    """Directory that already holds cn_clip's released files (nothing is downloaded here)."""
    policy: Literal["frozen", "last_k", "full"] = "full"
    trainable_last_k: int = 2
    """With ``policy: last_k``: how many final layers of each tower train."""


@dataclass
class ModelConfig:
    """SG-MFT head on top of the backbone; the ablation switches of docs/DESIGN.md."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    d_model: int = 64
    num_heads: int = 4
    num_sim_layers: int = 1
    num_sfm_layers: int = 2
    ffn_mult: int = 4
    dropout: float = 0.1
    classifier_dropout: float = 0.1
    pooling: Literal["mean", "cls"] = "mean"
    similarity_norm: Literal["sigmoid", "softmax"] = "sigmoid"
    coarse_guidance: bool = True
    """False: the coarse block sums self- and cross-attention without P_m."""
    fine_guidance: bool = True
    """False: the text FFN ignores the element-wise similarity (plain FFN)."""
    use_sim: bool = True
    fusion: Literal["sfm", "concat"] = "sfm"
    modalities: Literal["both", "text", "image"] = "both"
    linear_probe: bool = False
    """True: a linear classifier on pooled CLIP embeddings, the floor of the ablation table."""
    num_labels: int = 10


@dataclass
class SynthConfig:
    """The deterministic synthetic Weibo-like dataset used when ``data.path`` is empty."""

    n: int = 1200
    seed: int = 0
    text_noise: float = 0.3
    """Share of posts whose text carries no location cue."""
    image_noise: float = 0.3
    """Share of posts whose image carries no location cue."""
    image_swap: float = 0.1
    """Share of posts whose image is drawn from another category."""
    image_size: int = 64
    two_object_share: float = 0.0
    """Share of posts whose image shows two category pictures side by side (the label's and
    another's) and whose text, naming no place, says which one counts, by position
    ("左边那张") or by the colour of its shape ("白色图案那边"): only matching words to image
    patches gets them right. The noise shares above apply to the posts of neither this nor
    ``misleading_share``."""
    misleading_share: float = 0.0
    """Share of posts whose text names another category's place as where the poster is not
    ("好想去健身房撸铁"), while the image is the label's own picture."""


@dataclass
class DataConfig:
    path: str = ""
    """Dataset directory (Parquet shards per split + labels.json). Empty: synthesise one."""
    context_length: int = 52
    max_image_pixels: int = 40_000_000
    """Images with more pixels are refused before decoding (decompression bombs)."""
    batch_size: int = 32
    """Per-worker batch size."""
    preprocess_batch_size: int = 64
    preprocess_concurrency: int | None = None
    """Parallel decode+tokenise tasks. None: every cluster CPU the train workers leave free."""
    task_cpus: float = 0.25
    """CPUs each Ray Data task (read, decode+tokenise) asks for. A fraction, so a task fits
    beside train workers on any node: blocks lost with a node are rebuilt by re-running their
    tasks, and with workers of 1.5 CPUs on 2-CPU nodes no node had a whole CPU left, so the
    run waited for ever. ``preprocess_concurrency`` still bounds how many decode at once."""
    prefetch_batches: int = 4
    """Batches each train worker keeps ready ahead of the step (pinned and on their way to a GPU)."""
    materialize: Literal["auto", "always", "never"] = "auto"
    """Keep preprocessed splits in Ray's object store instead of decoding them again every
    epoch. auto: when the preprocessed split takes under a fifth of the object store."""
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class TrainConfig:
    run_name: str = "sgmft"
    storage_path: str = "runs"
    num_workers: int = 2
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    """With ``use_gpu``: the GPU share each worker reserves. Fractions pack several workers
    (so several Tune trials, e.g. 0.25 for four head-only trials on cached features) on one GPU."""
    cpus_per_worker: float = 0.5
    """Fractional on small machines so Ray Data keeps CPUs for preprocessing."""
    epochs: int = 5
    lr: float = 1e-3
    backbone_lr: float = 1e-4
    layer_decay: float = 0.8
    """Layer-wise learning-rate decay across backbone layers (1.0 = none)."""
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    class_weights: Literal["none", "balanced"] = "none"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU."""
    seed: int = 0
    max_failures: int = 2
    keep_checkpoints: int = 2
    metric: str = "val_accuracy"
    metric_mode: Literal["max", "min"] = "max"
    fail_once_at_step: int | None = None
    """Testing hook: the rank-0 worker crashes once at this global step."""
    features_path: str | None = None
    """Train the head on cached backbone features (frozen backbone) instead of images."""
    stall_timeout_s: float = 300.0
    """A run that makes no progress (no step, no epoch line) for this long fails, naming what
    Ray could not place, instead of waiting for ever (lost data on a full cluster, too few CPUs)."""


@dataclass
class TuneConfig:
    num_samples: int = 8
    max_concurrent_trials: int | None = None
    """None: as many as the cluster's resources fit."""
    searcher: Literal["random", "optuna"] = "random"
    grace_period: int = 1
    reduction_factor: int = 2
    cpus_per_worker: float = 0.25
    search_space: dict[str, Any] = field(default_factory=dict)
    """Dotted config keys to a distribution, e.g. ``train.lr: {loguniform: [1e-4, 1e-2]}``."""


@dataclass
class ServeConfig:
    model_dir: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.0
    """How long a model replica waits for more batches after the first arrives. 0: none; the
    batches that queued during the last forward form the next, so batches grow with load."""
    max_ongoing_requests: int = 32
    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    num_gpus_per_replica: float = 0.0
    num_cpus_per_replica: float = 0.5
    model_placement: Literal["replica", "ingress"] = "replica"
    """Where forwards run. ``replica``: a model deployment of its own, scaled apart from the
    ingress (min/max_replicas, target_ongoing_requests, initial_replicas), which a GPU wants.
    ``ingress``: every ingress replica loads the model and runs its own batches, with no
    process hop per batch: for CPU-only nodes, scaled with ``ingress_replicas``."""
    ingress_replicas: int | None = None
    """HTTP ingress replicas (parsing, decoding, tokenising): the CPU side of serving. None:
    one per CPU that Ray reports when the app is built, as many as fit beside the CPUs the
    model replicas reserve (num_cpus_per_replica x max_replicas)."""
    ingress_max_posts: int = 64
    """Posts one ingress replica holds at once (decoding, batching, at the model): more are
    answered 503 with Retry-After at once, so admitted posts keep their latency."""
    ingress_max_replicas: int | None = None
    """Above ``ingress_replicas``: the ingress autoscales up to this many replicas."""
    ingress_cpus_per_replica: float | None = None
    """CPUs each ingress replica reserves (None: ``num_cpus_per_replica``)."""
    ingress_node_resource: str | None = "sgmft_ingress"
    """Where some node of the cluster has this custom Ray resource (``cluster.yaml`` and the
    RayService give it to the head), each ingress replica asks for a little of it, so ingress
    replicas stay off the GPU workers: Serve's proxy does not retry a request whose ingress
    replica died, so the posts an ingress held on a lost worker would fail with 500. None, or
    no node with it, or the model in the ingress (``model_placement: ingress``): any node."""
    compile: bool = False
    """Run the model under torch.compile, with batch-size buckets compiled at start-up."""
    cuda_graphs: bool = True
    """On a GPU (ignored on a CPU, and under ``compile``): capture the forward as a CUDA graph
    per batch-size bucket at start-up and replay it, instead of ~1,500 kernel launches a batch."""
    jpeg_decode: Literal["auto", "ingress", "model"] = "auto"
    """Where JPEG posts are decoded. ``ingress``: on its CPUs, as every other format.
    ``model``: whole, upright colour JPEGs cross as their bytes and are decoded in batches on
    the model's device (nvJPEG on a GPU). ``auto``: ``model`` where the model runs on a GPU."""
    retry_deadline_s: float = 30.0
    """A post whose model replica died is retried on another until this deadline, then 503;
    an attempt on a replica that hangs ends at this deadline too."""
    max_replica_deaths: int = 3
    """A batch during which this many model replicas died in a row is not sent to another:
    its posts are answered 500 ``batch_killed_replicas``."""
    max_body_bytes: int = 10 * 1024 * 1024
    max_text_chars: int = 2000
    """Longer texts are truncated to this many characters (then to context_length tokens)."""
    max_batch_items: int = 32
    top_k: int = 3
    api_key_env: str | None = None
    """Off when None. Else the name of an environment variable of the cluster (read by the
    ingress replica at start-up; unset or empty is an error there) holding one or more API
    keys, comma-separated: every route but /healthz then needs ``Authorization: Bearer KEY``."""


@dataclass
class PretrainConfig:
    """Contrastive image-text pretraining of the backbone (``sgmft pretrain``): the backbone is
    ``model.backbone``, the schedule ``train.*`` and the batch ``data.batch_size`` per worker."""

    pairs_path: str = ""
    """A pair dataset (a dataset directory whose rows need no label). Empty: synthetic
    grounding pairs (:mod:`sgmft.data.pairs`) built once in the run directory."""
    synth_n: int = 4000
    synth_seed: int = 0
    synth_image_size: int = 64
    two_object_share: float = 0.7
    """Share of synthetic pairs that show two objects side by side (the rest show one)."""
    synth_val_frac: float = 0.1
    """Share of the synthetic pairs held out for the recall each epoch reports: with more
    pairs, a smaller share keeps the held-out set (and so what recall@1 means) the same size."""
    synth_test_frac: float = 0.1
    zero_shot_data: str | None = None
    """A labeled dataset directory: each epoch also scores zero-shot labelling of its val split,
    each label prompted as text ("我在{label}")."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted where lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any] | None) -> Config:
    """Build a checked :class:`Config` from plain data (YAML or JSON)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"the config must be a mapping at the top level, got {type(values).__name__}")
    config = _build(Config, values)
    validate(config)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; values are parsed as YAML scalars."""
    values = json.loads(json.dumps(values))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key")
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return _with_absolute_weights(config_from_dict(apply_overrides(values, overrides or [])))


def _with_absolute_weights(config: Config) -> Config:
    """Local backbone-weight paths made absolute against the current directory: workers read
    them, and a worker's directory is not the driver's (a Tune trial runs in its own), so
    ``checkpoint: runs/pretrain-tiny/backbone/weights.pt`` was not found by any trial."""
    backbone = config.model.backbone
    for name in ("checkpoint", "download_root"):
        value = getattr(backbone, name)
        if value and "://" not in value and not Path(value).expanduser().is_absolute():
            setattr(backbone, name, str(Path(value).expanduser().resolve()))
    return config


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True))


def validate(config: Config) -> None:
    """Checks across fields that types alone cannot express."""
    m, t, s = config.model, config.train, config.serve
    checks = [
        (m.backbone.preset in BACKBONE_PRESETS, "model.backbone.preset", f"must be one of {list(BACKBONE_PRESETS)}"),
        (m.d_model > 0 and m.d_model % m.num_heads == 0, "model.d_model", f"{m.d_model} must be a positive multiple of model.num_heads={m.num_heads}"),
        (m.num_sim_layers >= 0, "model.num_sim_layers", "must be >= 0"),
        (m.num_sfm_layers >= 1, "model.num_sfm_layers", "must be >= 1"),
        (0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)"),
        (m.num_labels >= 2, "model.num_labels", "must be >= 2"),
        (m.backbone.trainable_last_k >= 0, "model.backbone.trainable_last_k", "must be >= 0"),
        (config.data.context_length >= 3, "data.context_length", "must be >= 3 ([CLS] text [SEP])"),
        (config.data.batch_size >= 1, "data.batch_size", "must be >= 1"),
        (config.data.preprocess_concurrency is None or config.data.preprocess_concurrency >= 1,
         "data.preprocess_concurrency", "must be >= 1 (or empty for automatic)"),
        (0 < config.data.task_cpus <= 64, "data.task_cpus", "must be > 0 (a fraction lets tasks fit beside workers)"),
        (config.data.prefetch_batches >= 0, "data.prefetch_batches", "must be >= 0"),
        (t.num_workers >= 1, "train.num_workers", "must be >= 1"),
        (t.gpus_per_worker > 0 and (t.gpus_per_worker <= 1 or t.gpus_per_worker.is_integer()), "train.gpus_per_worker",
         f"{t.gpus_per_worker} must be in (0, 1] or a whole number of GPUs"),
        (t.epochs >= 1, "train.epochs", "must be >= 1"),
        (config.pretrain.synth_n >= 10, "pretrain.synth_n", "must be >= 10 (a pair for every split)"),
        (0.0 <= config.pretrain.two_object_share <= 1.0, "pretrain.two_object_share", "must be in [0, 1]"),
        (0.0 < config.pretrain.synth_val_frac < 1.0, "pretrain.synth_val_frac", "must be in (0, 1)"),
        (0.0 < config.pretrain.synth_test_frac < 1.0 - config.pretrain.synth_val_frac, "pretrain.synth_test_frac",
         "must be in (0, 1 - pretrain.synth_val_frac)"),
        (round(config.pretrain.synth_n * config.pretrain.synth_val_frac) >= 1, "pretrain.synth_val_frac",
         f"holds out no pair of pretrain.synth_n={config.pretrain.synth_n}"),
        (t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1"),
        (t.stall_timeout_s > 0, "train.stall_timeout_s", "must be > 0"),
        (0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)"),
        (0.0 < t.layer_decay <= 1.0, "train.layer_decay", "must be in (0, 1]"),
        (0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", "must be in [0, 1)"),
        (s.max_ongoing_requests >= s.max_batch_size, "serve.max_ongoing_requests", f"must be >= serve.max_batch_size={s.max_batch_size} or batches never fill"),
        (1 <= s.min_replicas <= s.max_replicas, "serve.min_replicas", "must satisfy 1 <= min_replicas <= max_replicas"),
        (s.max_body_bytes > 0, "serve.max_body_bytes", "must be > 0"),
        (s.ingress_replicas is None or s.ingress_replicas >= 1, "serve.ingress_replicas", "must be >= 1 (or empty: one per CPU)"),
        (s.ingress_max_replicas is None or s.ingress_max_replicas >= (s.ingress_replicas or 1), "serve.ingress_max_replicas",
         f"must be >= serve.ingress_replicas={s.ingress_replicas}"),
        (s.ingress_max_posts >= s.max_batch_size, "serve.ingress_max_posts",
         f"must be >= serve.max_batch_size={s.max_batch_size} or batches never fill"),
        (s.max_replica_deaths >= 1, "serve.max_replica_deaths", "must be >= 1"),
        (s.retry_deadline_s >= 0, "serve.retry_deadline_s", "must be >= 0"),
        (s.api_key_env is None or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", s.api_key_env) is not None, "serve.api_key_env",
         f"{s.api_key_env!r} is not an environment variable name (letters, digits, _); null turns API keys off"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")


def model_config_for(preset: str, **overrides: Any) -> ModelConfig:
    """A ModelConfig with the head width that goes with a backbone preset."""
    if preset not in HEAD_WIDTH:
        raise ConfigError(f"model.backbone.preset: {preset!r} is not one of {list(BACKBONE_PRESETS)}")
    d_model, heads = HEAD_WIDTH[preset]
    values = {"d_model": d_model, "num_heads": heads, **overrides}
    return ModelConfig(backbone=BackboneConfig(preset=preset), **values)
