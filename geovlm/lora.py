"""LoRA adapters through PEFT: which modules get them, wrapping the policy, their files, merging.

Each stage trains its own adapters on top of the model it starts from: ``model.path`` (or the
embedded tiny model) for the first stage, the previous stage's result with its adapters merged
for the next. A GRPO stage's reference model is that start model, which is exactly the policy
with its adapters disabled (``PeftModel.disable_adapter``): no second copy of the weights.

PEFT injects the LoRA layers into the HF model in place; the engines and stages keep working on
that model (its forwards, ``generate``, gradient checkpointing and the shared-prompt passes of
``geovlm.prefix`` are unchanged), and the ``PeftModel`` around it is kept for what only it
knows: disabling the adapters, their config and state, merging.

Files, in PEFT's format (``PeftModel.from_pretrained(base, folder)`` loads them)::

    adapter_config.json         r, alpha, dropout, target modules, base_model_name_or_path
    adapter_model.safetensors   the LoRA A / B weights

``base_model_name_or_path`` names the model the adapters apply to: a hub id, or the absolute path
of a folder (``init/``, the previous stage's ``final/``) that itself holds full weights or
adapters; ``load_merged`` follows that chain and merges.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from geovlm.config import ConfigError, LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PeftModel's state-dict names are the wrapped model's under this prefix.
PEFT_PREFIX = "base_model.model."


def _linear_names(root: torch.nn.Module, prefix: str, leaves: list[str]) -> list[str]:
    return [
        f"{prefix}.{name}"
        for name, module in root.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in leaves
    ]


def target_module_names(model: torch.nn.Module, lora: LoraConfig) -> list[str]:
    """Full names of the ``nn.Linear`` modules that get adapters: those named in
    ``lora.target_modules`` inside the language model's decoder layers, and with ``lora.vision``
    those named in ``lora.vision_target_modules`` inside the vision tower's blocks (never the
    embeddings, ``lm_head`` or the vision merger)."""
    body = model.model
    names = _linear_names(body.language_model.layers, "model.language_model.layers",
                          lora.target_modules)
    if not names:
        raise ConfigError(
            f"model.lora.target_modules={lora.target_modules} name no Linear module of the "
            f"language model's layers; they are named {_leaf_names(body.language_model.layers)}"
        )
    if lora.vision:
        vision = _linear_names(body.visual.blocks, "model.visual.blocks",
                               lora.vision_target_modules)
        if not vision:
            raise ConfigError(
                f"model.lora.vision_target_modules={lora.vision_target_modules} name no Linear "
                f"module of the vision blocks; they are named {_leaf_names(body.visual.blocks)}"
            )
        names += vision
    return names


def _leaf_names(root: torch.nn.Module) -> list[str]:
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in root.named_modules() if isinstance(m, torch.nn.Linear)}
    )


def base_name(model: torch.nn.Module) -> str:
    """What the model was loaded from, as adapters record it: a hub id, or an absolute path."""
    name = str(getattr(model, "name_or_path", "") or "")
    return str(Path(name).resolve()) if name and Path(name).is_dir() else name


def add_adapters(model: torch.nn.Module, lora: LoraConfig):
    """Inject fresh LoRA adapters into ``model`` (in place; every other weight frozen) and
    return the ``PeftModel`` around it. ``lora_B`` starts at zero (PEFT's default), so the
    policy starts equal to ``model``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_module_names(model, lora),
        base_model_name_or_path=base_name(model) or None,
    )
    return get_peft_model(model, config)


def lora_keys(state: dict[str, Any]) -> list[str]:
    """The adapter weights among the wrapped model's state-dict keys."""
    return [key for key in state if ".lora_A." in key or ".lora_B." in key]


def save_adapters(adapters, directory: Path, model_state: dict[str, torch.Tensor]) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory``.

    ``model_state`` is the wrapped model's full state (names without PEFT's prefix, as the
    engines gather it, also when sharded); only its adapter weights are written.
    """
    adapter_state = {PEFT_PREFIX + key: model_state[key] for key in lora_keys(model_state)}
    # save_embedding_layers=False: no embedding is adapted, and "auto" would look the base up.
    adapters.save_pretrained(
        directory, state_dict=adapter_state, save_embedding_layers=False
    )


def _file_key(key: str, adapter_name: str) -> str:
    """A wrapped-model key (``...q_proj.lora_A.default.weight``) as PEFT saves it."""
    for part in ("lora_A", "lora_B"):
        key = key.replace(f".{part}.{adapter_name}.", f".{part}.")
    return PEFT_PREFIX + key


def read_adapter_state(directory: Path, like: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters saved in ``directory`` as a state dict of ``like`` (the wrapped model), for
    the engines' loading; every adapter of ``like`` must be in the file and nothing else."""
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS} (a LoRA checkpoint has one)")
    saved = load_file(path)
    wanted = {_file_key(key, "default"): key for key in lora_keys(like.state_dict())}
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    if missing or unexpected:
        raise RuntimeError(
            f"{path} does not match model.lora: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]} (were the adapters trained with other target modules?)"
        )
    return {key: saved[file_key] for file_key, key in wanted.items()}


def adapter_base(source: str) -> str:
    """``base_model_name_or_path`` of the adapters at ``source`` (a folder or a hub id)."""
    local = Path(source) / ADAPTER_CONFIG
    if local.is_file():
        base = json.loads(local.read_text()).get("base_model_name_or_path")
    else:
        from peft import PeftConfig

        base = PeftConfig.from_pretrained(source).base_model_name_or_path
    if not base:
        raise ValueError(
            f"{source}: {ADAPTER_CONFIG} names no base_model_name_or_path (the model the "
            "adapters apply to)"
        )
    return base


def load_merged(source: str, dtype: torch.dtype, attn: str):
    """Model + processor of the adapters at ``source`` merged into their base, which is itself
    loaded by ``geovlm.model.load_pretrained`` (a hub id, full weights, or adapters again)."""
    from peft import PeftModel

    from geovlm.model import load_pretrained

    base_source = adapter_base(source)
    local = Path(source).is_dir()
    if local and Path(base_source).resolve() == Path(source).resolve():
        raise ValueError(f"{source}: {ADAPTER_CONFIG} names the folder itself as its base")
    model, processor = load_pretrained(base_source, dtype, attn)
    merged = PeftModel.from_pretrained(model, source).merge_and_unload()
    merged.name_or_path = str(Path(source).resolve()) if local else source
    if local and _holds_processor(Path(source)):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(source)
    return merged, processor


def _holds_processor(folder: Path) -> bool:
    return any(
        (folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")
    )
