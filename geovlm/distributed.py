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
every rank for the policy too). With LoRA (``model.lora``, ``geovlm.lora``) there is no copy: the
engine injects the stage's adapters before wrapping the model, the optimizer sees only them, the
reference is the policy with its adapters disabled (``Engine.adapters_disabled``), and checkpoints
hold the adapters (PEFT format) instead of full weights.

Without ``torchrun`` (WORLD_SIZE unset) the engine is plain single-process PyTorch. Process
group, ranks and collectives live in ``geovlm.runtime``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from geovlm.checkpoint import load_model_state, load_trainer_state, save_checkpoint
from geovlm.config import ConfigError, RunConfig, StageConfig
from geovlm.optim import (
    ADAM_BETAS,
    ADAM_EPS,
    make_optimizer,
    make_scheduler,
    parameter_groups,
    warmup_steps,
)
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
        adapters: the ``PeftModel`` around ``policy`` when it trains LoRA adapters, else None.
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
        adapters=None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.stage = stage
        self.runtime = runtime
        self.uses_fused_linear = fused_linear and not self.shards_parameters
        self.adapters = adapters

    @property
    def policy(self) -> torch.nn.Module:
        """The unwrapped model (for generate, save_pretrained, no-grad log-probs)."""
        return getattr(self.model, "module", self.model)

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run ``policy`` as the model the stage started from (its LoRA adapters off)."""
        if self.adapters is None:
            raise RuntimeError("the policy trains no LoRA adapters (model.lora.enabled=false)")
        with self.adapters.disable_adapter():
            yield

    def release_model(self, directory: Path) -> torch.nn.Module | None:
        """The trained model for what follows the stage (evaluation, the next stage): a plain HF
        model, adapters merged in, known as ``directory`` (its ``final/``, which the next
        stage's adapters name as their base). Sharded or wrapped engines return None: the model
        is then reloaded from ``directory``."""
        if self.adapters is None:
            return self.policy
        merged = self.adapters.merge_and_unload()
        merged.name_or_path = str(Path(directory).resolve())
        self.adapters = None
        return merged

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
        """Write ``directory`` (HF weights or LoRA adapters, optimizer, schedule, RNG, ``step``,
        ``extra``); rank 0 writes, every rank contributes its part of the state."""
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
                adapters=self.adapters,
            )
        barrier()
        return directory

    def save_final(self, directory: Path, processor, config: RunConfig, step: int) -> Path:
        """The finished model as an HF directory (full weights, or LoRA adapters plus, with
        ``model.lora.merge_on_save``, the merged weights in ``merged/``; no optimizer state)."""
        model_state = self.full_model_state()
        if self.runtime.is_main:
            save_checkpoint(
                directory,
                self.policy,
                processor,
                config,
                step=step,
                model_state=model_state,
                adapters=self.adapters,
                merge=self.adapters is not None and config.model.lora.merge_on_save,
            )
        barrier()
        return directory

    def load_checkpoint(self, directory: Path) -> tuple[int, dict[str, Any]]:
        """Restore weights, optimizer and schedule from ``directory``; returns (its step, extra).

        Every rank reads the full weights and optimizer state (they load in a single process
        too); DeepSpeed ZeRO ranks read their own optimizer partition.
        """
        state = load_trainer_state(directory)
        if self.adapters is not None:
            from geovlm.lora import read_adapter_state

            model_state = read_adapter_state(directory, self.policy)
        else:
            model_state = load_model_state(directory, self.policy)
        self.load_state(model_state, state["optimizer"], state["scheduler"])
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

        _load_model_state(self.policy, model_state, adapters_only=self.adapters is not None)
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


def _load_model_state(
    module: torch.nn.Module, state: dict[str, torch.Tensor], adapters_only: bool = False
) -> None:
    """Load ``state`` (full weights, or only the LoRA adapters) into ``module``, strictly."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if adapters_only:
        missing = [k for k in missing if ".lora_A." in k or ".lora_B." in k]
    else:
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

    def release_model(self, directory: Path) -> None:
        return None

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
    (clipping at the JSON's ``gradient_clipping``). The schedule, the stage's or the JSON's
    (``deepspeed_config``), is stepped here once per optimizer step of the stage, not by
    DeepSpeed at each of GRPO's ``num_iterations`` updates. Gradient accumulation runs on
    DeepSpeed's micro-step counter (``gradient_accumulation_steps`` = the stage's window) without
    DeepSpeed's 1/GAS loss scaling: the stages normalise the loss over the window themselves.
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

    def release_model(self, directory: Path) -> None:
        return None

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
                    _load_model_state(self.policy, model_state, self.adapters is not None)
        else:
            _load_model_state(self.policy, model_state, self.adapters is not None)
        if scheduler_state is not None:
            self.scheduler.load_state_dict(scheduler_state)
            if hasattr(self.scheduler, "last_batch_iteration"):
                # DeepSpeed's schedules only restore their counter: set the lr it gives.
                self.scheduler.step(self.scheduler.last_batch_iteration)


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


def _resolve_auto(config: dict, key: str, value: Any, where: str, owner: str) -> None:
    """Set ``config[key]`` to ``value`` (the stage's) when unset or "auto"; an explicit different
    value is an error that names ``owner``, the stage setting it contradicts (DeepSpeed would
    otherwise disagree with the stage about the batch, the learning rate or the schedule)."""
    current = config.get(key, "auto")
    if current == "auto":
        config[key] = value
    elif current != value and not (
        isinstance(current, int | float) and isinstance(value, int | float)
        and math.isclose(current, value, rel_tol=1e-12)
    ):
        raise ConfigError(
            f"{where}: {key}={current!r} but {owner} gives {value!r}; set it to \"auto\" "
            f"(or change {owner})"
        )


def _fill_auto(config: dict, key: str, value: Any) -> None:
    """Replace an "auto" ``config[key]`` by ``value``; an explicit value is the JSON's own."""
    if config.get(key) == "auto":
        config[key] = value


# Parameters of DeepSpeed's warm-up schedules that the stage owns (filled when unset), by type.
STAGE_SCHEDULE_KEYS = {
    "WarmupLR": ("warmup_max_lr", "warmup_num_steps"),
    "WarmupDecayLR": ("warmup_max_lr", "warmup_num_steps", "total_num_steps"),
    "WarmupCosineLR": ("warmup_num_steps", "total_num_steps", "cos_min_ratio"),
}


def _section(config: dict, key: str, where: str) -> dict | None:
    section = config.get(key)
    if section is None:
        return None
    if not isinstance(section, dict) or not isinstance(section.get("params", {}), dict):
        raise ConfigError(f"{where}: {key!r} must be an object with a \"params\" object")
    section.setdefault("params", {})
    return section


def _fill_optimizer(config: dict, stage: StageConfig, where: str) -> None:
    """The JSON's ``optimizer`` section: the stage owns lr and weight decay (filled when unset
    or "auto", refused when different); "auto" betas / eps become AdamW's of ``geovlm.optim``."""
    section = _section(config, "optimizer", where)
    if section is None:
        return
    params = section["params"]
    name = f"stages.{stage.name}"
    _resolve_auto(params, "lr", stage.lr, f"{where}: optimizer.params", f"{name}.lr")
    _resolve_auto(
        params, "weight_decay", stage.weight_decay, f"{where}: optimizer.params",
        f"{name}.weight_decay",
    )
    _fill_auto(params, "betas", list(ADAM_BETAS))
    _fill_auto(params, "eps", ADAM_EPS)


def _fill_scheduler(config: dict, stage: StageConfig, where: str) -> None:
    """The JSON's ``scheduler`` section: the stage's peak lr, warm-up and total steps and final
    lr ratio fill DeepSpeed's warm-up schedules (refused when different); "auto" start values
    are 0."""
    section = _section(config, "scheduler", where)
    if section is None:
        return
    params = section["params"]
    name = f"stages.{stage.name}"
    owned = {
        "warmup_max_lr": (stage.lr, f"{name}.lr"),
        "warmup_num_steps": (warmup_steps(stage), f"{name}.warmup_ratio x steps"),
        "total_num_steps": (stage.steps, f"{name}.steps"),
        "cos_min_ratio": (stage.min_lr_ratio, f"{name}.min_lr_ratio"),
    }
    takes = STAGE_SCHEDULE_KEYS.get(section.get("type"), ())
    for key, (value, owner) in owned.items():
        if key in params or key in takes:
            _resolve_auto(params, key, value, f"{where}: scheduler.params", owner)
    _fill_auto(params, "warmup_min_lr", 0.0)
    _fill_auto(params, "warmup_min_ratio", 0.0)


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
    every ``"auto"`` value from the stage and the model (the convention of HF's Trainer).

    The stage fills, and refuses an explicit value that contradicts it:

    - ``train_micro_batch_size_per_gpu``: ``batch_size / world`` (samples for SFT, prompts for
      GRPO); ``gradient_accumulation_steps``: ``grad_accum`` for SFT, 1 for GRPO (one backward
      per optimizer step); ``train_batch_size``: their product times ``world``;
    - ``optimizer.params.lr`` / ``weight_decay``: the stage's ``lr`` / ``weight_decay`` (filled
      when unset too; biases and norm weights get no decay either way);
    - ``scheduler.params``: ``warmup_max_lr`` = ``lr``, ``warmup_num_steps`` =
      ``max(1, round(warmup_ratio x steps))``, ``total_num_steps`` = ``steps``,
      ``cos_min_ratio`` = ``min_lr_ratio``: filled when "auto", and when unset for the
      parameters ``WarmupLR`` / ``WarmupDecayLR`` / ``WarmupCosineLR`` take
      (``STAGE_SCHEDULE_KEYS``).

    It fills "auto" (an explicit value is the JSON's own):

    - ``gradient_clipping``: ``max_grad_norm`` (also when unset);
    - ``bf16.enabled`` / ``fp16.enabled``: whether the model's dtype is bf16 / fp16;
    - ``optimizer.params.betas`` / ``eps``: ``geovlm.optim``'s AdamW values (0.9, 0.99), 1e-8;
    - ``scheduler.params.warmup_min_lr`` / ``warmup_min_ratio``: 0;
    - ``zero_optimization.reduce_bucket_size``: hidden², ``stage3_prefetch_bucket_size``:
      0.9·hidden², ``stage3_param_persistence_threshold``: 10·hidden (DeepSpeed's defaults when
      the hidden size is unknown).

    The JSON owns everything else: the ZeRO stage and offload, the optimizer type and its other
    parameters, the schedule type and shape. Without an ``optimizer`` section the stage's AdamW
    is used (``DeepSpeedCPUAdam`` when the optimizer state is offloaded, as ZeRO-Offload needs);
    without a ``scheduler`` section, the stage's warm-up + cosine schedule
    (``geovlm.optim.make_scheduler``). Either schedule advances once per optimizer step of the
    stage (GRPO's ``num_iterations`` updates share one). An "auto" left with no value is an
    error.
    """
    if path is None:
        raise ConfigError("distributed.strategy=deepspeed needs distributed.deepspeed=<json path>")
    config, where = _read_json(path)
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
    batch = f"stages.{stage.name}.batch_size / world size"
    _resolve_auto(config, "train_micro_batch_size_per_gpu", micro, where, batch)
    _resolve_auto(
        config, "gradient_accumulation_steps", accum, where,
        f"stages.{stage.name}.grad_accum" if stage.kind == "sft" else "GRPO (one backward)",
    )
    _resolve_auto(
        config, "train_batch_size", micro * accum * world, where,
        f"stages.{stage.name}.batch_size x grad_accum",
    )
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = stage.max_grad_norm
    for key, want in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        section = config.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = dtype == want
    _fill_optimizer(config, stage, where)
    _fill_scheduler(config, stage, where)
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
    # The stage's torch AdamW (no optimizer section, nothing offloaded) is a client optimizer
    # ZeRO has not "tested".
    config["zero_allow_untested_optimizer"] = True
    return config


def offloads_optimizer(ds_config: dict) -> bool:
    """Whether ZeRO keeps the optimizer state on the CPU / NVMe (ZeRO-Offload)."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


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
    """Wrap ``model`` for this run's strategy and build its optimizer and schedule; with
    ``model.lora.enabled`` the stage's fresh LoRA adapters are injected first (``model`` is
    changed in place) and only they train."""
    fused = fused_linear_requested(config, runtime.device)
    adapters = None
    if config.model.lora.enabled:
        from geovlm.lora import add_adapters

        adapters = add_adapters(model, config.model.lora)
    if runtime.world_size <= 1:
        optimizer = make_optimizer(model, stage)
        scheduler = make_scheduler(optimizer, stage)
        return Engine(model, optimizer, scheduler, stage, runtime, fused, adapters)
    strategy = config.distributed.strategy
    if strategy == "ddp":
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        # Unused parameters are real: a text-only batch never reaches the vision tower.
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=True
        )
        optimizer = make_optimizer(wrapped.module, stage)
        scheduler = make_scheduler(optimizer, stage)
        return Engine(wrapped, optimizer, scheduler, stage, runtime, fused, adapters)
    if strategy == "fsdp2":
        _fully_shard(model)
        optimizer = make_optimizer(model, stage)
        scheduler = make_scheduler(optimizer, stage)
        return FSDP2Engine(model, optimizer, scheduler, stage, runtime, fused, adapters)
    if strategy == "deepspeed":
        return _deepspeed_engine(model, config, stage, runtime, fused, adapters)
    raise ConfigError(f"unknown distributed.strategy {strategy!r}")


def _deepspeed_engine(
    model: torch.nn.Module,
    config: RunConfig,
    stage: StageConfig,
    runtime: Runtime,
    fused: bool,
    adapters=None,
) -> DeepSpeedEngine:
    """``deepspeed.initialize`` with the optimizer and schedule ``deepspeed_config`` documents:
    the JSON's sections when it has them, else the stage's."""
    import deepspeed

    ds_config = deepspeed_config(
        config.distributed.deepspeed,
        stage,
        runtime.world_size,
        dtype=next(model.parameters()).dtype,
        hidden_size=_hidden_size(model),
    )
    groups = parameter_groups(model, stage)
    optimizer = None
    if "optimizer" not in ds_config:
        if offloads_optimizer(ds_config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised CPU Adam (a
            # C++ op built on first use), not torch's.
            optimizer = DeepSpeedCPUAdam(
                groups, lr=stage.lr, betas=ADAM_BETAS, eps=ADAM_EPS, adamw_mode=True
            )
        else:
            optimizer = torch.optim.AdamW(groups, lr=stage.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    engine, _, _, ds_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups, config=ds_config
    )
    if ds_scheduler is not None:
        scheduler = ds_scheduler
        # Stepped by DeepSpeedEngine.step once per stage step, not by DeepSpeed at every update.
        engine.lr_scheduler = None
    else:
        scheduler = make_scheduler(engine.basic_optimizer, stage)
    return DeepSpeedEngine(engine, engine.optimizer, scheduler, stage, runtime, fused, adapters)


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
    Not for LoRA: there the reference is the policy with its adapters disabled.
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
            # Parameter offload applies; the optimizer, its offload and its schedule do not.
            zero.pop("offload_optimizer", None)
            ds_config.pop("optimizer", None)
            ds_config.pop("scheduler", None)
            engine, *_ = deepspeed.initialize(model=reference, config=ds_config)
            engine.eval()
            return engine
    return reference
