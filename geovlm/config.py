"""Typed configuration: one dataclass per concern holds every default.

A run is configured by a YAML preset (``geovlm/configs/<name>.yaml`` or a path) plus ``key=value``
overrides on the command line, applied in that order. Keys are dotted paths into ``RunConfig``;
list items are addressed by index or, for stages, by name (``stages.sft.steps=20``). Values are
parsed as YAML scalars and checked against the field's type; an unknown key or a wrong type is an
error that names the key. The resolved config is saved with every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from geovlm.engines import check_engine_name
from geovlm.kernels.options import GRPOLossOptions, ImportanceSamplingLevel, LossType
from geovlm.rewards.options import RewardChoices

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "tiny-cpu"


class ConfigError(ValueError):
    """A config key, value or file that cannot be used; the message names it."""


@dataclass
class TinyModelConfig:
    """Sizes of the embedded Qwen2.5-VL-architecture model (used when ``model.path`` is unset).

    The pixel budget suits the embedded world's 112x112 scenes (an 8x8 patch grid, 16 merged
    image tokens) and caps larger images at 224x224. ``number_tokens`` N > 0 gives the integers
    below N one token each (location tokens, ``geovlm.tokenizer.build_tokenizer``); 0 keeps
    Qwen's one token per digit.
    """

    vocab_size: int = 1024
    number_tokens: int = 0
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_num_heads: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 224 * 224


@dataclass
class LoraConfig:
    """LoRA adapters through PEFT (``geovlm.lora``): each stage trains its own adapters on top of
    the model it starts from, and a GRPO stage's reference is that model (the adapters disabled).

    ``target_modules`` are module names (the last part of a dotted name) adapted in the language
    model's decoder layers; with ``vision`` also ``vision_target_modules`` in the vision tower's
    blocks. ``merge_on_save`` also writes each stage's merged weights to ``final/merged/``.
    """

    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        ]
    )
    vision: bool = False
    vision_target_modules: list[str] = field(
        default_factory=lambda: ["qkv", "proj", "gate_proj", "up_proj", "down_proj"]
    )
    merge_on_save: bool = False


@dataclass
class VisionPretrainConfig:
    """Dense pretraining of the embedded tiny model's vision tower when it is built
    (``geovlm.vision_pretrain``): per-token object classes, colours, boxes and positions of the
    train split's scenes. ``steps`` 0: off (the tower starts at random). Only when the embedded
    model is built (``model.path`` unset, no ``init/`` yet): a checkpoint's tower is already
    trained, and a preset's setting must not stop ``model.path`` from loading one."""

    steps: int = 0
    lr: float = 3.0e-3
    batch_size: int = 32


@dataclass
class ModelConfig:
    """Which policy to build and how to run it. ``path``: a local model folder (HF format, or a
    PEFT adapter folder), or a Hugging Face hub id resolved through the local HF cache (and
    downloaded where the network allows); unset: the embedded tiny model."""

    path: str | None = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    vision_pretrain: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    freeze_vision: bool = False
    liger_kernels: bool = True
    fused_linear_loss: Literal["auto", "on", "off"] = "auto"
    box_convention: Literal["pixels", "qwen2vl", "qwen25vl", "geochat"] = "qwen25vl"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    """Where samples come from. ``"embedded"`` is the built-in synthetic EO world; a file is read
    by ``geovlm.data.readers``; ``val`` / ``test`` may be null (no validation loss / no held-out
    evaluation). The embedded world's val / test splits only go with its train split."""

    train: str = "embedded"
    val: str | None = "embedded"
    test: str | None = "embedded"
    image_root: str | None = None
    format: Literal["auto", "llava", "vlmr1", "earthdial"] = "auto"
    # How bracketed boxes in the files are written (geovlm.data.boxes): their units (null: the
    # format's, 0..100 "geochat" for EarthDial / GeoChat benchmarks, else pixels) and what five
    # numbers mean (null: the format's, corners + angle for EarthDial / GeoChat, else centre).
    source_convention: Literal["pixels", "qwen2vl", "qwen25vl", "geochat"] | None = None
    box_layout: Literal["corners", "centre", "xyxy"] | None = None
    tasks: list[str] | None = None
    task_modules: list[str] = field(default_factory=list)  # imported to register their tasks
    n_train_scenes: int = 600
    n_val_scenes: int = 24
    n_test_scenes: int = 60
    # More (or fewer) test scenes for some tasks, e.g. {referred_det: 300}: the test stream's
    # first n scenes give that task's samples, its first n_test_scenes every other task's (a
    # detection change of a few points is invisible on 60 prompts). Tasks the run does not
    # train (data.tasks) are left out.
    n_test_scenes_by_task: dict[str, int] = field(default_factory=dict)
    image_size: int = 112
    # The embedded world's detection difficulty (geovlm.data.scenes.WorldSettings): every
    # object's size times object_scale, at most max_objects objects a scene.
    object_scale: float = 1.0
    max_objects: int = 6
    seed: int = 0
    # Background processes preparing batches ahead of the loop (geovlm.data.loader); null: up to
    # 4 on CUDA, 1 on CPU when 3+ cores are free for it, else 0 (inline).
    workers: int | None = None
    # Processor encodings kept for samples drawn again (geovlm.data.encoding_cache), in MiB of
    # tensors per process; 0: none. Background workers keep none (they are off the critical path).
    encoding_cache_mb: int = 1024


# The reward choices of a stage (stages.<i>.rewards.*) are the rewards' own dataclass, so that
# their defaults live once, next to the code that reads them.
RewardConfig = RewardChoices


@dataclass
class StageConfig:
    """One training stage: SFT, or GRPO on a task set. Stages run in order, each from the last."""

    name: str = "sft"
    kind: Literal["sft", "grpo"] = "sft"
    tasks: list[str] | None = None
    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    eval_every: int = 0
    save_every: int = 50
    # How often each training sample of a task appears in the stage's epoch (default 1), e.g.
    # {referred_det: 4}: a multi-task stage that gives one task a larger share of its batches.
    task_weights: dict[str, int] = field(default_factory=dict)
    # SFT only: pack samples into rows without padding (geovlm.data.packing). "auto": always with
    # flash-attention 2, with SDPA / eager when rows no wider than the longest sample save rows
    # (the rule is in geovlm.sft); "on": rows of up to max_length; "off": padded batches.
    packing: Literal["auto", "on", "off"] = "auto"
    # GRPO only.
    num_generations: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    num_iterations: int = 1
    # GRPO: run each prompt (image included) once per group, not G times: rollouts prefill it
    # once and the teacher-forced passes attend to its shared KV cache (geovlm.prefix). SFT
    # (with packing auto, SDPA / eager attention): run the leading tokens every sample of a
    # micro-batch shares (the system turn) once, and pack only the rest (geovlm.sft_prefix).
    # Exact; off only for debugging or comparison.
    prompt_sharing: bool = True
    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    # Allowed values: geovlm.kernels.options (LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS).
    loss_type: LossType = "dapo"
    importance_sampling_level: ImportanceSamplingLevel = "token"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    use_bias_correction_kl: bool = False
    reward_weights: dict[str, float] = field(default_factory=dict)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    # GRPO: an SFT anchor (geovlm.anchor, InstructGPT's PPO-ptx). Each step adds anchor_weight x
    # the next-token loss of anchor_batch_size training samples of anchor_tasks (null: every task
    # of the run's data that the stage does not train) to the GRPO loss, so that a stage trained
    # on one task does not overwrite what the SFT taught the others. 0: off.
    anchor_weight: float = 0.0
    anchor_batch_size: int = 8
    anchor_tasks: list[str] | None = None

    def loss_options(self) -> GRPOLossOptions:
        """The GRPO loss options of this stage (the sampling temperature, TRL's epsilon names,
        ``max_new_tokens`` as dr_grpo's length); sapo / vespo keep the kernels' defaults."""
        return GRPOLossOptions(
            temperature=self.temperature,
            beta=self.beta,
            eps_low=self.epsilon_low,
            eps_high=self.epsilon_high,
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_new_tokens,
            delta=self.delta,
            use_bias_correction_kl=self.use_bias_correction_kl,
        )


@dataclass
class EvalConfig:
    """Held-out evaluation run before training and at the end of each stage."""

    enabled: bool = True
    batch_size: int = 32
    max_new_tokens: int = 96
    max_samples_per_task: int | None = None
    use_embeddings: bool = False
    # After a GRPO stage: its objective (mean reward of sampled completions) on held-out prompts
    # of its tasks, before and after the stage.
    sampled_reward: bool = True
    sampled_generations: int = 4


@dataclass
class RolloutConfig:
    """Which rollout engine (``geovlm.engines``) samples the GRPO rollouts, the sampled-reward
    objective and the held-out evaluation's answers."""

    engine: str = "builtin"

    def __post_init__(self) -> None:
        try:
            check_engine_name(self.engine)
        except ValueError as err:
            raise ConfigError(f"rollout.engine: {err}") from err


@dataclass
class DistributedConfig:
    """Data parallelism and sharding under torchrun."""

    strategy: Literal["ddp", "fsdp2", "deepspeed"] = "ddp"
    deepspeed: str | None = None
    backend: Literal["auto", "nccl", "gloo"] = "auto"


# Experiment trackers ``report_to`` may name (as HF ``TrainingArguments.report_to``).
REPORT_TO = ("none", "tensorboard", "wandb", "trackio", "mlflow")


@dataclass
class RunConfig:
    """Everything one ``python -m geovlm.train`` run needs.

    ``report_to``: the experiment trackers that receive the run's metrics, config and held-out
    tables (``geovlm.trackers``): one of ``REPORT_TO``, several as a list or a comma-separated
    string. TensorBoard by default: it writes local files only (``<run>/tensorboard``), needs no
    account or network, and is what most users open first.
    """

    name: str = "tiny-cpu"
    output_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
    profile: bool = False
    report_to: str | list[str] = "tensorboard"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    eval: EvalConfig = field(default_factory=EvalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict:
        return asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        # YAML 1.1 reads on/off/yes/no as booleans; a choice spelled "on"/"off" means the word.
        if isinstance(value, bool) and {"on", "off"} <= set(get_args(tp)):
            value = "on" if value else "off"
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp)
        return {_coerce(k, key_tp, key): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, key)
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; Python's float() reads every spelling.
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{key}: expected a float, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {[where + k for k in unknown]}; "
            f"{cls.__name__} has {sorted(names)}"
        )
    kwargs = {
        name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
        for name, value in data.items()
    }
    return cls(**kwargs)


def _set_path(tree: dict, path: list[str], value: Any, full_key: str) -> None:
    """Set ``value`` at dotted ``path`` inside the plain-dict form of a RunConfig."""
    node: Any = tree
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            index = _list_index(node, part, full_key)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"unknown config key {full_key!r} (no {part!r} there)")
        if last:
            node[part] = value
        elif node[part] is None:
            raise ConfigError(f"{full_key}: {'.'.join(path[: i + 1])} is unset")
        else:
            node = node[part]


def _list_index(items: list, part: str, full_key: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise ConfigError(f"{full_key}: index {index} out of range ({len(items)} items)")
        return index
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if part in names:
        return names.index(part)
    raise ConfigError(f"{full_key}: no list item named {part!r} (have {names})")


def resolve_preset(name_or_path: str) -> Path:
    """A preset name (``tiny-cpu``) or a YAML path -> the YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} is neither a YAML file nor a preset {known}")


def parse_override(text: str) -> tuple[str, Any]:
    """``"stages.sft.steps=20"`` -> ``("stages.sft.steps", 20)``; values are YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    if not raw.strip():
        return key.strip(), None
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        # Not YAML (e.g. a path "..."): the text itself, checked against the field's type.
        return key.strip(), raw


def load_config(
    preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Build the RunConfig of a preset (default ``tiny-cpu``) with ``key=value`` overrides."""
    path = resolve_preset(preset or DEFAULT_PRESET)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        tree = _build(RunConfig, data).to_dict()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key.split("."), value, key)
        # Rebuild after each override so that a replaced list or mapping gets its defaults
        # filled in and the next override (``stages=[...]`` then ``stages.sft.lr=...``) sees them.
        tree = _build(RunConfig, tree).to_dict()
    return check(_build(RunConfig, tree))


def known_tasks(task_modules: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Task names a config may list (``data.tasks``, ``stages.<i>.tasks``): the registered tasks,
    those of ``task_modules`` (``data.task_modules``) included."""
    from geovlm.tasks import registry

    registry.import_task_modules(task_modules)
    return list(registry.names())


def report_targets(value: str | list[str]) -> list[str]:
    """``report_to`` as the list of trackers to open (``[]`` for ``none``), in the given order.

    ``"tensorboard,wandb"`` and ``["tensorboard", "wandb"]`` are the same; ``none`` may not be
    combined with a tracker; an unknown name is a ``ConfigError``.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [item.strip().lower() for item in items if item.strip()]
    unknown = [name for name in names if name not in REPORT_TO]
    if unknown:
        raise ConfigError(f"report_to: unknown tracker(s) {unknown}; choose from {list(REPORT_TO)}")
    if "none" in names and len(set(names)) > 1:
        raise ConfigError(f"report_to: 'none' cannot be combined with trackers ({names})")
    return list(dict.fromkeys(name for name in names if name != "none"))


def _check_lora(lora: LoraConfig) -> None:
    if not lora.enabled:
        return
    if lora.r < 1 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
        raise ConfigError(
            f"model.lora: r={lora.r} must be >= 1, alpha={lora.alpha} > 0 and "
            f"dropout={lora.dropout} in [0, 1)"
        )
    if not lora.target_modules:
        raise ConfigError("model.lora.target_modules: name at least one module (e.g. q_proj)")


def _check_vision_pretrain(model: ModelConfig) -> None:
    pre = model.vision_pretrain
    if pre.steps < 0 or pre.lr <= 0 or pre.batch_size < 1:
        raise ConfigError(
            f"model.vision_pretrain: steps={pre.steps} must be >= 0, lr={pre.lr} > 0 and "
            f"batch_size={pre.batch_size} >= 1"
        )


def embedded_world(data: DataConfig):
    """``data.object_scale`` / ``data.max_objects`` as the embedded world's ``WorldSettings``;
    values it refuses are a ``ConfigError`` naming the key."""
    from geovlm.data.scenes import WorldSettings

    try:
        return WorldSettings(object_scale=data.object_scale, max_objects=data.max_objects)
    except ValueError as err:
        raise ConfigError(f"data.object_scale / data.max_objects: {err}") from err


def check(config: RunConfig) -> RunConfig:
    """Checks across fields, before anything is built: task names, the data splits' sources,
    unique stage names, tracker names, LoRA sizes. Raises ``ConfigError`` naming the key."""
    report_targets(config.report_to)
    _check_lora(config.model.lora)
    _check_vision_pretrain(config.model)
    embedded_world(config.data)
    try:
        known = known_tasks(config.data.task_modules)
    except ValueError as err:
        raise ConfigError(f"data.task_modules: {err}") from err
    lists = [("data.tasks", config.data.tasks)] + [
        (f"stages.{stage.name}.tasks", stage.tasks) for stage in config.stages
    ]
    cache_mb = config.data.encoding_cache_mb
    if cache_mb < 0:
        raise ConfigError(f"data.encoding_cache_mb must be >= 0 (0: no cache), got {cache_mb}")
    by_task = config.data.n_test_scenes_by_task
    lists.append(("data.n_test_scenes_by_task", list(by_task)))
    if any(n < 0 for n in by_task.values()):
        raise ConfigError(f"data.n_test_scenes_by_task: counts must be ints >= 0, got {by_task}")
    for stage in config.stages:
        lists.append((f"stages.{stage.name}.anchor_tasks", stage.anchor_tasks))
        _check_anchor(stage)
        key = f"stages.{stage.name}.task_weights"
        weights = stage.task_weights
        lists.append((key, list(weights)))
        if any(w < 1 for w in weights.values()):
            raise ConfigError(f"{key}: weights must be ints >= 1, got {weights}")
    # Unknown names first: a typo in data.tasks is the error to report, not its consequences.
    for key, tasks in lists:
        unknown = [t for t in tasks or () if t not in known]
        if unknown:
            raise ConfigError(f"{key}: unknown task(s) {unknown}; known: {known}")
    for stage in config.stages:
        trained = stage.tasks or config.data.tasks
        outside = sorted(set(stage.task_weights) - set(trained)) if trained is not None else []
        if outside:
            raise ConfigError(
                f"stages.{stage.name}.task_weights: {outside} not among the stage's tasks "
                f"{trained}; set stages.{stage.name}.task_weights={{}} (or other weights) "
                "when narrowing the tasks"
            )
    if config.data.train != "embedded":
        for split in ("val", "test"):
            if getattr(config.data, split) == "embedded":
                raise ConfigError(
                    f"data.{split}='embedded' with data.train={config.data.train!r}: the "
                    f"embedded world's {split} split would judge a model trained on your file; "
                    f"set data.{split}=<file> or data.{split}=null"
                )
    names = [stage.name for stage in config.stages]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"stages: names must be unique (stage folders), repeated: {repeated}")
    return config


def _check_anchor(stage: StageConfig) -> None:
    key = f"stages.{stage.name}"
    if stage.anchor_weight < 0:
        raise ConfigError(f"{key}.anchor_weight must be >= 0 (0: off), got {stage.anchor_weight}")
    if stage.anchor_weight == 0:
        return
    if stage.kind != "grpo":
        raise ConfigError(
            f"{key}.anchor_weight: the SFT anchor is a GRPO stage's; an SFT stage trains its "
            f"tasks directly (set {key}.anchor_weight=0)"
        )
    if stage.anchor_batch_size < 1:
        raise ConfigError(f"{key}.anchor_batch_size must be >= 1, got {stage.anchor_batch_size}")
    overlap = sorted(set(stage.anchor_tasks or ()) & set(stage.tasks or ()))
    if overlap:
        raise ConfigError(
            f"{key}.anchor_tasks: {overlap} are trained by the stage itself; the anchor keeps "
            "the tasks the stage does not train"
        )


def check_stage_tasks(config: RunConfig) -> None:
    """Every stage keeps a task once ``data.tasks`` narrows the run (the stage would otherwise
    have no samples); ``geovlm.train`` checks it before building anything."""
    if config.data.tasks is None:
        return
    for stage in config.stages:
        if stage.tasks is not None and not set(stage.tasks) & set(config.data.tasks):
            raise ConfigError(
                f"stages.{stage.name}.tasks: none of {stage.tasks} is in data.tasks "
                f"{config.data.tasks}: the stage would have no samples"
            )


def config_from_dict(data: dict) -> RunConfig:
    """Rebuild a RunConfig from its saved dict (``config.yaml`` of a run or checkpoint)."""
    return _build(RunConfig, data)


def save_config(config: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _choices(tp: Any) -> str:
    """``[type]`` of a field for ``--help``: the choices of a Literal, else the type's name."""
    args = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) else []
    literal = next((a for a in args if get_origin(a) is Literal), None)
    if get_origin(tp) is Literal or literal is not None:
        values = get_args(tp if get_origin(tp) is Literal else literal)
        optional = " or null" if type(None) in get_args(tp) else ""
        return "one of " + " | ".join(str(v) for v in values) + optional
    return _type_name(tp)


def describe_options(config: RunConfig | None = None) -> str:
    """Every key with its value in ``config`` (default: the built-in defaults) and its type or
    choices, for ``--help``. Stage fields are listed once with their defaults, then each stage of
    ``config`` with the values it sets differently."""
    config = config if config is not None else RunConfig()
    lines: list[str] = []

    def walk(cls: type, prefix: str, current: Any) -> None:
        hints = _hints(cls)
        for f in fields(cls):
            value = getattr(current, f.name)
            key = f"{prefix}{f.name}"
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, key + ".", value)
            elif f.name == "stages":
                continue
            else:
                notes = {
                    "name": "the run folder is output_dir/name",
                    "report_to": " | ".join(REPORT_TO) + "; several: a list or a,b",
                }
                note = f"   ({notes[key]})" if key in notes else ""
                lines.append(f"  {key} = {value!r}   [{_choices(tp)}]{note}")

    walk(RunConfig, "", config)
    lines.append("  stages: one StageConfig per stage (stages.<index|name>.<field>); defaults:")
    walk(StageConfig, "stages.<i>.", StageConfig())
    default = _leaves(asdict(StageConfig()))
    for index, stage in enumerate(config.stages):
        own = {
            k: v
            for k, v in _leaves(asdict(stage)).items()
            if v != default.get(k) or k in ("name", "kind")
        }
        settings = ", ".join(f"{k}={v!r}" for k, v in own.items())
        lines.append(f"  stage {index}: {settings}")
    return "\n".join(lines)


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"rewards": {"vqa": "exact"}}`` -> ``{"rewards.vqa": "exact"}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
