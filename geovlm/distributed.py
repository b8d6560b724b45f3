"""The training engines (single process, DDP, FSDP2, DeepSpeed ZeRO) behind one small interface.

An ``Engine`` owns what differs between the strategies: how the model is wrapped, how a loss is
back-propagated, how an optimizer step is taken, and how its whole state (full weights, optimizer,
schedule, ZeRO partitions) is saved to and loaded from a checkpoint that loads in a single
process. The stages only call ``engine.backward(loss)``, ``engine.step()``,
``engine.save_checkpoint(...)`` and ``engine.load_checkpoint(...)``, and read ``engine.policy``,
``engine.model``, ``engine.lr``, ``engine.shards_parameters`` and ``engine.uses_fused_linear``.

Data parallelism: every rank takes its contiguous shard of the global batch. Gradients are
averaged over ranks (DDP's all-reduce, FSDP2's reduce-scatter, DeepSpeed's reduction), so a stage
scales its per-rank loss such that the average is the loss of the global batch.

Checkpoints hold the full weights and, for single / DDP / FSDP2, the full optimizer state keyed by
parameter name (``torch.distributed.checkpoint.state_dict`` format), so a checkpoint written by any
of them resumes under any other and at any world size. DeepSpeed's ZeRO optimizer state stays in
its own per-rank partitions (``optimizer_shards/rank<r>.pt``) and resumes at the same world size.

The frozen GRPO reference model follows the policy: sharded like it under FSDP2 and ZeRO-3
(``prepare_reference``), a full copy per rank otherwise (DDP and ZeRO-1/2 keep full weights on
every rank for the policy too).

Without ``torchrun`` (WORLD_SIZE unset) the engine is plain single-process PyTorch. Process
group, ranks and collectives live in ``geovlm.runtime``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from geovlm.checkpoint import load_model_state, load_trainer_state, save_checkpoint
from geovlm.config import ConfigError, RunConfig, StageConfig
from geovlm.optim import make_optimizer, make_scheduler
from geovlm.runtime import Runtime, barrier

SHARD_DIR = "optimizer_shards"


def _full_state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


class Engine:
    """Single-process or DDP training: ``loss.backward()``, clipping and an AdamW step.

    Attributes:
        model: the wrapped model the stage runs forward passes through (DDP / FSDP2 / DeepSpeed).
        policy: the unwrapped model (generate, save_pretrained, no-grad log-probs).
        uses_fused_linear: whether losses take the fused linear kernel on the last hidden state
            and ``lm_head.weight`` (no ``[tokens, V]`` logits): requested by the config and
            possible, i.e. parameters are not sharded (the kernel reads ``lm_head.weight``
            directly). Under DDP / ZeRO-1/2 the model body still runs through the wrapper's
            forward (``model.forward_hidden``), so gradients are synchronised as usual.
    """

    # Whether a rank holds only a shard of each parameter (FSDP2, ZeRO-3): then nothing may
    # read a weight such as lm_head.weight outside the wrapped model's forward.
    shards_parameters = False

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer,
        scheduler,
        stage: StageConfig,
        runtime: Runtime,
        fused_linear: bool = False,
    ):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.stage = stage
        self.runtime = runtime
        self.uses_fused_linear = fused_linear and not self.shards_parameters

    @property
    def policy(self) -> torch.nn.Module:
        """The unwrapped model (for generate, save_pretrained, no-grad log-probs)."""
        return getattr(self.model, "module", self.model)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, advance_schedule: bool = True) -> float:
        """Clip, step the optimizer (and the schedule); returns the pre-clip gradient norm."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.stage.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if advance_schedule:
            self.scheduler.step()
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # --- checkpoints (collective: every rank calls these) ------------------------------------
    def save_checkpoint(
        self, directory: Path, processor, config: RunConfig, step: int, extra: dict | None = None
    ) -> Path:
        """Write ``directory`` (HF weights, optimizer, schedule, RNG, ``step``, ``extra``); rank 0
        writes, every rank contributes its part of the state."""
        model_state = self.full_model_state()
        optimizer_state = self.optimizer_state()
        if self.runtime.is_main:
            save_checkpoint(
                directory,
                self.policy,
                processor,
                config,
                step=step,
                model_state=model_state,
                optimizer_state=optimizer_state or None,
                scheduler_state=self.scheduler.state_dict(),
                extra=extra,
            )
        barrier()
        return directory

    def save_final(self, directory: Path, processor, config: RunConfig, step: int) -> Path:
        """The finished model as an HF directory (full weights, no optimizer state)."""
        model_state = self.full_model_state()
        if self.runtime.is_main:
            save_checkpoint(
                directory, self.policy, processor, config, step=step, model_state=model_state
            )
        barrier()
        return directory

    def load_checkpoint(self, directory: Path) -> tuple[int, dict[str, Any]]:
        """Restore weights, optimizer and schedule from ``directory``; returns (its step, extra).

        Every rank reads the full weights and optimizer state (they load in a single process
        too); DeepSpeed ZeRO ranks read their own optimizer partition.
        """
        state = load_trainer_state(directory)
        self.load_state(
            load_model_state(directory, self.policy), state["optimizer"], state["scheduler"]
        )
        self._load_partitions(Path(directory))
        return state["step"], state.get("extra", {})

    def full_model_state(self) -> dict[str, torch.Tensor]:
        return self.policy.state_dict()

    def optimizer_state(self) -> dict[str, Any]:
        """The full optimizer state keyed by parameter name (empty on ranks other than 0)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(
            self.policy, self.optimizer, options=_full_state_options(cpu_offload=True)
        )

    def load_state(self, model_state: dict, optimizer_state: dict | None, scheduler_state) -> None:
        """Load full weights and a full, name-keyed optimizer state (every rank passes both)."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        _load_model_state(self.policy, model_state)
        if optimizer_state is not None:
            set_optimizer_state_dict(
                self.policy, self.optimizer, optimizer_state, options=_full_state_options()
            )
        if scheduler_state is not None:
            self.scheduler.load_state_dict(scheduler_state)

    def _load_partitions(self, checkpoint: Path) -> None:
        """Only DeepSpeed writes ZeRO optimizer partitions; another engine cannot use them."""
        shards = checkpoint / SHARD_DIR
        if shards.is_dir():
            raise RuntimeError(
                f"{checkpoint} holds DeepSpeed ZeRO optimizer partitions "
                f"({len(list(shards.glob('rank*.pt')))} ranks): resume it with "
                "distributed.strategy=deepspeed at that world size, or start a new stage from its "
                "weights (model.path)"
            )


def _load_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    # Tied lm_head weights are saved once; anything else missing means a wrong checkpoint.
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


class FSDP2Engine(Engine):
    """PyTorch FSDP2 (``fully_shard`` per transformer block, the vision tower, then the root)."""

    shards_parameters = True

    def full_model_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=_full_state_options(cpu_offload=True))

    def load_state(self, model_state: dict, optimizer_state: dict | None, scheduler_state) -> None:
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # Every rank holds the full state (read from disk), so no broadcast is needed; strict=False
        # because a tied lm_head is saved once.
        options = _full_state_options(broadcast_from_rank0=False, strict=False)
        set_model_state_dict(self.model, model_state, options=options)
        if optimizer_state is not None:
            set_optimizer_state_dict(self.model, self.optimizer, optimizer_state, options=options)
        if scheduler_state is not None:
            self.scheduler.load_state_dict(scheduler_state)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-1/2/3 from a standard DeepSpeed JSON config.

    The engine does the backward (reduce / reduce-scatter, loss scaling in fp16) and the step
    (clipping at the JSON's ``gradient_clipping``); our LambdaLR schedule still drives the learning
    rate so every strategy follows the same schedule. Gradient accumulation runs on DeepSpeed's
    micro-step counter (``gradient_accumulation_steps`` = the stage's window) without DeepSpeed's
    1/GAS loss scaling: the stages normalise the loss over the window themselves.
    """

    def backward(self, loss: torch.Tensor) -> None:
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.backward(loss, scale_wrt_gas=False)
        if not boundary:
            # Inside the window: this only advances DeepSpeed's micro-step counter.
            self.model.step()

    def step(self, advance_schedule: bool = True) -> float:
        if not self.model.is_gradient_accumulation_boundary():
            raise RuntimeError(
                "DeepSpeed step before the end of the gradient-accumulation window: the stage "
                "made fewer backward passes than gradient_accumulation_steps"
            )
        self.model.step()
        if advance_schedule:
            self.scheduler.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def zero_stage(self) -> int:
        return self.model.zero_optimization_stage()

    @property
    def shards_parameters(self) -> bool:
        return self.zero_stage == 3

    def full_model_state(self) -> dict[str, torch.Tensor]:
        if self.zero_stage == 3:
            state = self.model._zero3_consolidated_16bit_state_dict()
            return state if state is not None else {}
        return self.policy.state_dict()

    def optimizer_state(self) -> dict[str, Any]:
        # ZeRO partitions the optimizer state: each rank saves its own partition
        # (save_checkpoint), which resumes at the same world size.
        return {}

    def save_checkpoint(
        self, directory: Path, processor, config: RunConfig, step: int, extra: dict | None = None
    ) -> Path:
        """The checkpoint of ``Engine.save_checkpoint`` plus every rank's optimizer partition in
        ``optimizer_shards/rank<r>.pt``, staged beside it and moved in by rank 0."""
        directory = Path(directory)
        staged = directory.parent / f".{SHARD_DIR}-{directory.name}"
        staged.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.optimizer.state_dict(), staged / f"rank{self.runtime.rank}.pt")
        barrier()
        super().save_checkpoint(directory, processor, config, step, extra)
        if self.runtime.is_main:
            staged.rename(directory / SHARD_DIR)
        barrier()
        return directory

    def _load_partitions(self, checkpoint: Path) -> None:
        shards = checkpoint / SHARD_DIR
        saved = len(list(shards.glob("rank*.pt")))
        world = self.runtime.world_size
        if saved == 0:
            raise RuntimeError(
                f"{checkpoint} was not written by DeepSpeed (no ZeRO optimizer partitions): resume "
                "it with the strategy that wrote it, or start a new stage from its weights"
            )
        if saved != world:
            raise RuntimeError(
                f"{checkpoint}: DeepSpeed ZeRO optimizer partitions of {saved} ranks, but this run "
                f"has {world}; resume at the same world size"
            )
        # The partitions hold the fp32 master weights too; they overwrite the module's copy.
        partitions = _ShardFiles(shards, saved)
        self.model.optimizer.load_state_dict(partitions, load_from_fp32_weights=True)

    def load_state(self, model_state: dict, optimizer_state: dict | None, scheduler_state) -> None:
        if self.zero_stage == 3:
            import deepspeed

            params = list(self.policy.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if dist.get_rank() == 0:
                    _load_model_state(self.policy, model_state)
        else:
            _load_model_state(self.policy, model_state)
        if scheduler_state is not None:
            self.scheduler.load_state_dict(scheduler_state)


class _ShardFiles(Sequence):
    """The saved ZeRO partitions as the list DeepSpeed's ``load_state_dict`` indexes by rank,
    read from disk only when indexed (a rank reads its own, not every rank's)."""

    def __init__(self, directory: Path, count: int):
        self.directory = directory
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, rank):
        if not isinstance(rank, int) or not 0 <= rank < self.count:
            raise IndexError(rank)
        path = self.directory / f"rank{rank}.pt"
        return torch.load(path, map_location="cpu", weights_only=False)


def _hidden_size(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return getattr(text, "hidden_size", None)


def _resolve_auto(config: dict, key: str, value: Any, where: str) -> None:
    """Set ``config[key]`` to ``value`` when unset or "auto"; an explicit different value is an
    error (DeepSpeed would otherwise disagree with the stage about the batch)."""
    current = config.get(key, "auto")
    if current == "auto":
        config[key] = value
    elif current != value:
        raise ConfigError(
            f"{where}: {key}={current!r} but the stage needs {value!r}; set it to \"auto\""
        )


def _read_json(path: str) -> tuple[dict, str]:
    file = Path(path)
    if not file.is_file():
        packaged = Path(__file__).parent / "configs" / path
        file = packaged if packaged.is_file() else file
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"distributed.deepspeed: cannot read {path}: {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: a DeepSpeed config must be a JSON object")
    return config, str(file)


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []


def deepspeed_config(
    path: str | None,
    stage: StageConfig,
    world: int,
    dtype: torch.dtype = torch.float32,
    hidden_size: int | None = None,
) -> dict:
    """Read a standard DeepSpeed JSON (a path, or a file name in ``geovlm/configs/``) and fill in
    every ``"auto"`` value from the stage and the model (the convention of HF's Trainer):

    - ``train_micro_batch_size_per_gpu``: the stage's ``batch_size / world`` (samples for SFT,
      prompts for GRPO); ``gradient_accumulation_steps``: ``grad_accum`` for SFT, 1 for GRPO (one
      backward per optimizer step); ``train_batch_size``: their product times ``world``.
      Explicit values that disagree with the stage are errors.
    - ``gradient_clipping``: ``max_grad_norm``.
    - ``bf16.enabled`` / ``fp16.enabled``: whether the model's dtype is bf16 / fp16.
    - ``zero_optimization.reduce_bucket_size``: hidden², ``stage3_prefetch_bucket_size``:
      0.9·hidden², ``stage3_param_persistence_threshold``: 10·hidden (DeepSpeed's defaults when
      the hidden size is unknown).

    ``optimizer`` and ``scheduler`` sections are rejected: the stage config owns both.
    """
    if path is None:
        raise ConfigError("distributed.strategy=deepspeed needs distributed.deepspeed=<json path>")
    config, where = _read_json(path)
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(
                f"{where}: remove {key!r}: the stage config owns the optimizer and the schedule"
            )
    if stage.batch_size % world:
        raise ConfigError(
            f"stage {stage.name!r}: batch_size {stage.batch_size} is not a multiple of the "
            f"world size {world}"
        )
    zero_stage = config.get("zero_optimization", {}).get("stage", 0)
    if zero_stage not in (1, 2, 3):
        raise ConfigError(
            f"{where}: zero_optimization.stage must be 1, 2 or 3 (got {zero_stage}); "
            "for plain data parallelism use distributed.strategy=ddp"
        )
    micro = stage.batch_size // world
    accum = stage.grad_accum if stage.kind == "sft" else 1
    _resolve_auto(config, "train_micro_batch_size_per_gpu", micro, where)
    _resolve_auto(config, "gradient_accumulation_steps", accum, where)
    _resolve_auto(config, "train_batch_size", micro * accum * world, where)
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = stage.max_grad_norm
    for key, want in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        section = config.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = dtype == want
    zero = config.get("zero_optimization")
    if isinstance(zero, dict):
        hidden = hidden_size or 0
        sizes = {
            "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden,
        }
        for key, value in sizes.items():
            if zero.get(key) == "auto":
                # Without a hidden size DeepSpeed's own default applies.
                if hidden_size:
                    zero[key] = value
                else:
                    del zero[key]
    left = _find_auto(config)
    if left:
        raise ConfigError(f"{where}: no automatic value for {left}; set them explicitly")
    config["zero_allow_untested_optimizer"] = True
    return config


def _fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules to ``fully_shard`` before the root, innermost first.

    Each transformer block (language and vision) is a unit, so only one block's full weights
    exist at a time. The vision tower is a unit too: ``generate`` encodes the images by calling
    it directly, outside the root's forward. The embeddings, final norm and ``lm_head`` stay with
    the root: the model reads ``embed_tokens`` outside the language model's forward, and a tied
    ``lm_head`` shares its weight (tied weights must live in one unit).
    """
    units = [
        m
        for m in model.modules()
        if type(m).__name__.endswith(("DecoderLayer", "VisionBlock"))
    ]
    visual = getattr(getattr(model, "model", None), "visual", None)
    if visual is not None:
        units.append(visual)
    return units


def _fully_shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for unit in _fsdp_units(model):
        fully_shard(unit)
    fully_shard(model)
    # generate() runs the root's own weights (the image encoding) before its first forward:
    # gather them for the whole call, which also makes the root, not the vision unit, FSDP's root.
    if hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")
    return model


def prepare_engine(
    model: torch.nn.Module, config: RunConfig, stage: StageConfig, runtime: Runtime
) -> Engine:
    """Wrap ``model`` for this run's strategy and build its optimizer and schedule."""
    fused = fused_linear_requested(config, runtime.device)
    if runtime.world_size <= 1:
        optimizer = make_optimizer(model, stage)
        return Engine(model, optimizer, make_scheduler(optimizer, stage), stage, runtime, fused)
    strategy = config.distributed.strategy
    if strategy == "ddp":
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        # Unused parameters are real: a text-only batch never reaches the vision tower.
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=True
        )
        optimizer = make_optimizer(wrapped.module, stage)
        return Engine(wrapped, optimizer, make_scheduler(optimizer, stage), stage, runtime, fused)
    if strategy == "fsdp2":
        _fully_shard(model)
        optimizer = make_optimizer(model, stage)
        scheduler = make_scheduler(optimizer, stage)
        return FSDP2Engine(model, optimizer, scheduler, stage, runtime, fused)
    if strategy == "deepspeed":
        import deepspeed

        optimizer = make_optimizer(model, stage)
        ds_config = deepspeed_config(
            config.distributed.deepspeed,
            stage,
            runtime.world_size,
            dtype=next(model.parameters()).dtype,
            hidden_size=_hidden_size(model),
        )
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config
        )
        scheduler = make_scheduler(optimizer, stage)
        return DeepSpeedEngine(engine, ds_optimizer, scheduler, stage, runtime, fused)
    raise ConfigError(f"unknown distributed.strategy {strategy!r}")


def fused_linear_requested(config: RunConfig, device: torch.device) -> bool:
    """``model.fused_linear_loss``: "on", or "auto" on CUDA (the engine also needs unsharded
    parameters, ``Engine.uses_fused_linear``)."""
    setting = config.model.fused_linear_loss
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def prepare_reference(
    model: torch.nn.Module, config: RunConfig, stage: StageConfig, runtime: Runtime
) -> torch.nn.Module:
    """A frozen copy of ``model`` (call before the policy is wrapped), placed like the policy.

    FSDP2: sharded the same way (its forward gathers one block at a time). DeepSpeed ZeRO-3: a
    ZeRO-3 inference engine without optimizer (as TRL does). Otherwise a plain full copy on
    every rank. Every rank must run the reference's forwards in lockstep when it is sharded.
    """
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    if runtime.world_size <= 1:
        return reference
    strategy = config.distributed.strategy
    if strategy == "fsdp2":
        return _fully_shard(reference)
    if strategy == "deepspeed":
        ds_config = deepspeed_config(
            config.distributed.deepspeed,
            stage,
            runtime.world_size,
            dtype=next(model.parameters()).dtype,
            hidden_size=_hidden_size(model),
        )
        if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
            import deepspeed

            zero = ds_config["zero_optimization"]
            # Parameter offload applies; optimizer offload has no optimizer to act on.
            zero.pop("offload_optimizer", None)
            engine, *_ = deepspeed.initialize(model=reference, config=ds_config)
            engine.eval()
            return engine
    return reference
