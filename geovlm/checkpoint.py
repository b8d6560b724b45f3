"""Atomic checkpoints in HF format, plus the training state needed for exact resume.

Layout of one checkpoint directory::

    <stage_dir>/checkpoint-<step>/
        config.json, model.safetensors, ...     HF ``save_pretrained`` (model + processor)
        trainer_state.pt                        optimizer, scheduler, RNG states, step, extras
        run_config.yaml                         the resolved RunConfig

With LoRA (``geovlm.lora``) the model files are the adapters instead, in PEFT's format
(``adapter_config.json``, ``adapter_model.safetensors``: ``PeftModel.from_pretrained`` loads them
onto the base they name); a stage's ``final/`` may add ``merged/``, the full merged weights, which
``from_pretrained`` loads alone.

A checkpoint is written into a temporary sibling directory and renamed into place, so a crash
leaves either the previous checkpoint or the new one, never half of one. ``final/`` marks a
finished stage.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geovlm.atomic import replace_dir, staging_dir
from geovlm.config import RunConfig, save_config

STATE_FILE = "trainer_state.pt"
FINAL = "final"
MERGED = "merged"


def holds_model(directory: Path) -> bool:
    """Whether ``directory`` holds a saved model: full weights or LoRA adapters."""
    names = ("config.json", "adapter_config.json")
    return any((Path(directory) / name).is_file() for name in names)


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from (python, numpy, torch CPU and CUDA)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    processor: Any,
    config: RunConfig,
    *,
    step: int,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    scheduler_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    adapters: Any = None,
    merge: bool = False,
) -> Path:
    """Write a loadable HF model dir + trainer state atomically; returns ``directory``.

    ``model_state`` is the full (unsharded) state dict when the live model is sharded; by default
    the model's own ``state_dict()``. With ``adapters`` (the ``PeftModel`` around ``model``) the
    LoRA adapters are written instead of the weights, and with ``merge`` also ``merged/``.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(directory.parent, f".{directory.name}.tmp-")
    try:
        from geovlm.model import unwrap

        unwrapped = unwrap(model)
        if adapters is not None:
            from geovlm.lora import save_adapters

            state = model_state if model_state is not None else unwrapped.state_dict()
            save_adapters(adapters, tmp, state)
        else:
            unwrapped.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        if merge:
            _save_merged(tmp, unwrapped, processor, config)
        state = {
            "step": step,
            "rng": rng_state(),
            "optimizer": optimizer_state,
            "scheduler": scheduler_state,
            "extra": extra or {},
        }
        torch.save(state, tmp / STATE_FILE)
        save_config(config, tmp / "run_config.yaml")
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _save_merged(folder: Path, like: torch.nn.Module, processor: Any, config: RunConfig) -> None:
    """``folder/merged``: the adapters in ``folder`` merged into their base, loaded afresh on the
    CPU (so that it works the same for sharded engines), with the processor and run config."""
    from geovlm.lora import load_merged

    dtype = next(like.parameters()).dtype
    merged, _ = load_merged(str(folder), dtype, like.config._attn_implementation)
    merged.save_pretrained(folder / MERGED, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(folder / MERGED)
    save_config(config, folder / MERGED / "run_config.yaml")


def load_model_state(directory: Path, like: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of an HF checkpoint directory as a state dict of ``like``'s class, on CPU.

    Loaded through ``from_pretrained`` because ``save_pretrained`` may store weights under the
    checkpoint-format names (e.g. ``visual.*`` for ``model.visual.*``), which only transformers'
    loader maps back.
    """
    dtype = next(like.parameters()).dtype
    # FSDP2 swaps a sharded module's class for a generated subclass; load the model class.
    cls = next(c for c in type(like).__mro__ if not c.__name__.startswith("FSDP"))
    loaded = cls.from_pretrained(directory, dtype=dtype, device_map="cpu")
    return loaded.state_dict()


def load_trainer_state(directory: Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a geovlm checkpoint (no {STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=False)


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The highest-step complete ``checkpoint-<step>`` in ``stage_dir``, or None."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return None
    found = []
    for path in stage_dir.glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return max(found)[1] if found else None


def prune_checkpoints(stage_dir: Path, keep: int = 1) -> None:
    """Delete all but the newest ``keep`` step checkpoints (``final`` is never touched)."""
    found = sorted(
        (int(p.name.split("-", 1)[1]), p)
        for p in Path(stage_dir).glob("checkpoint-*")
        if p.name.split("-", 1)[1].isdigit()
    )
    for _, path in found[:-keep] if keep else found:
        shutil.rmtree(path, ignore_errors=True)
