"""torchrun glue: process group, the training engine (single, DDP, FSDP2, DeepSpeed), collectives.

An ``Engine`` owns what differs between the strategies: how the model is wrapped, how a loss is
back-propagated, how an optimizer step is taken, and how full (unsharded) weights and optimizer
state are gathered for a checkpoint that loads in a single process. The stages only call
``engine.backward(loss)``, ``engine.step()``, ``engine.save(...)`` and ``engine.load(...)``.

Without ``torchrun`` (WORLD_SIZE unset) the engine is plain single-process PyTorch.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from geovlm.config import ConfigError, RunConfig, StageConfig


def init_distributed(config: RunConfig) -> tuple[int, int]:
    """Start the process group when launched by torchrun; returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = config.distributed.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _collective_device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def all_reduce_sum(value: float | int) -> float | int:
    """Sum a Python number over ranks (identity when single-process)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return int(round(tensor.item())) if isinstance(value, int) else tensor.item()


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of metrics over ranks (identity when single-process)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    device = _collective_device()
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist(), strict=True))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Transformer blocks to shard one by one (language and vision stacks)."""
    blocks = []
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("DecoderLayer") or name.endswith("VisionBlock"):
            blocks.append(module)
    return blocks


class Engine:
    """Single-process or DDP training: ``loss.backward()`` and an AdamW step."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, stage: StageConfig):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.stage = stage

    @property
    def policy(self) -> torch.nn.Module:
        """The unwrapped model (for generate, save_pretrained, the reference copy)."""
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

    # --- checkpoint state (collective: every rank calls these) ---------------------------
    def full_model_state(self) -> dict[str, torch.Tensor]:
        return self.policy.state_dict()

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state(self, model_state: dict, optimizer_state: dict | None, scheduler_state) -> None:
        _load_model_state(self.policy, model_state)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        if scheduler_state is not None:
            self.scheduler.load_state_dict(scheduler_state)


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
    """PyTorch FSDP2 (``fully_shard`` per transformer block, then the root)."""

    def full_model_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def optimizer_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(
            self.model,
            self.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )

    def load_state(self, model_state: dict, optimizer_state: dict | None, scheduler_state) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False, strict=False)
        set_model_state_dict(self.model, model_state, options=options)
        if optimizer_state is not None:
            set_optimizer_state_dict(self.model, self.optimizer, optimizer_state, options=options)
        if scheduler_state is not None:
            self.scheduler.load_state_dict(scheduler_state)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-1/2/3 from a standard DeepSpeed JSON config.

    The engine does the backward (loss scaling, reduce-scatter) and the step (clipping from the
    JSON's ``gradient_clipping``, else ``max_grad_norm``); our LambdaLR schedule still drives the
    learning rate so every strategy follows the same schedule.
    """

    def __init__(self, engine, optimizer, scheduler, stage: StageConfig):
        super().__init__(engine, optimizer, scheduler, stage)

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def step(self, advance_schedule: bool = True) -> float:
        self.model.step()
        if advance_schedule:
            self.scheduler.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def zero_stage(self) -> int:
        return self.model.zero_optimization_stage()

    def full_model_state(self) -> dict[str, torch.Tensor]:
        if self.zero_stage == 3:
            state = self.model._zero3_consolidated_16bit_state_dict()
            return state if state is not None else {}
        return self.policy.state_dict()

    def optimizer_state(self) -> dict[str, Any]:
        # ZeRO shards optimizer state; each rank saves its own shard (see save_sharded_state).
        return {}

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


def deepspeed_config(path: str | None, stage: StageConfig, world: int) -> dict:
    """Read a standard DeepSpeed JSON and fill in the values the stage owns."""
    if path is None:
        raise ConfigError("distributed.strategy=deepspeed needs distributed.deepspeed=<json path>")
    file = Path(path)
    if not file.is_file():
        packaged = Path(__file__).parent / "configs" / path
        file = packaged if packaged.is_file() else file
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"distributed.deepspeed: cannot read {path}: {err}") from err
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(
                f"{path}: remove {key!r}: the stage config owns the optimizer and the schedule"
            )
    micro = max(1, stage.batch_size // world)
    config.setdefault("train_micro_batch_size_per_gpu", micro)
    config.setdefault("gradient_accumulation_steps", 1)
    config.setdefault("gradient_clipping", stage.max_grad_norm)
    config["zero_allow_untested_optimizer"] = True
    for key in ("bf16", "fp16"):
        if config.get(key, {}).get("enabled") == "auto":
            config[key]["enabled"] = torch.cuda.is_available() and key == "bf16"
    return config


def prepare_engine(model: torch.nn.Module, config: RunConfig, stage: StageConfig, ctx) -> Engine:
    """Wrap ``model`` for this run's strategy and build its optimizer and schedule."""
    from geovlm.loop import make_optimizer, make_scheduler

    if ctx.world_size <= 1:
        optimizer = make_optimizer(model, stage)
        return Engine(model, optimizer, make_scheduler(optimizer, stage), stage)
    strategy = config.distributed.strategy
    if strategy == "ddp":
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=True
        )
        optimizer = make_optimizer(wrapped.module, stage)
        return Engine(wrapped, optimizer, make_scheduler(optimizer, stage), stage)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in _decoder_blocks(model):
            fully_shard(block)
        fully_shard(model)
        optimizer = make_optimizer(model, stage)
        return FSDP2Engine(model, optimizer, make_scheduler(optimizer, stage), stage)
    if strategy == "deepspeed":
        import deepspeed

        optimizer = make_optimizer(model, stage)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=deepspeed_config(config.distributed.deepspeed, stage, ctx.world_size),
        )
        return DeepSpeedEngine(engine, ds_optimizer, make_scheduler(optimizer, stage), stage)
    raise ConfigError(f"unknown distributed.strategy {strategy!r}")
