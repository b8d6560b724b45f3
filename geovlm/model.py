"""Policy and reference models: a tiny offline Qwen2.5-VL, or a Qwen2-VL / Qwen2.5-VL checkpoint.

One code path serves both: ``build_policy`` either builds a ``Qwen2_5_VLForConditionalGeneration``
from a small ``Qwen2_5_VLConfig`` (text hidden ~128, a 2-block vision tower with patch 14 and
spatial merge 2) with a tokenizer trained on the corpus and the real Qwen2-VL image processor,
or loads a checkpoint directory with ``AutoModelForImageTextToText`` / ``AutoProcessor``; then
the same placement, dtype, attention backend, gradient checkpointing and freezing apply.

Shapes: a batch is the dict of ``geovlm.data.collate`` (``input_ids`` ``[B, T]``, ...).
``forward_hidden`` returns the final-norm hidden states ``[B, T, H]`` (the input of ``lm_head``,
for the fused linear GRPO loss), ``forward_logits`` the logits ``[B, T, V]``, and
``lm_head_weight`` the ``[V, H]`` weight they are related by.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from geovlm.config import RunConfig, TinyModelConfig, embedded_world
from geovlm.data.collate import DEFAULT_SYSTEM_PROMPT
from geovlm.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
SYSTEM_PROMPT_WEIGHT = 64

# Sizes of the tiny model, from the one definition of their defaults (``config.TinyModelConfig``);
# ``build_policy(tiny={...})`` overrides any of them.
TINY_DEFAULTS: dict[str, Any] = asdict(TinyModelConfig())


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def default_attn_implementation(device: str | torch.device) -> str:
    """flash-attention 2 on CUDA when ``flash_attn`` is importable, else PyTorch SDPA."""
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16`` from ``torch.bfloat16`` or ``"bfloat16"``."""
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'bfloat16' or 'float32'")
    return resolved


def _resolve(
    device: str | torch.device, dtype: torch.dtype | str | None, attn_implementation: str | None
) -> tuple[torch.dtype, str]:
    dtype = as_dtype(dtype) if dtype is not None else default_dtype(device)
    attn = attn_implementation or default_attn_implementation(device)
    if attn not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attn_implementation {attn!r}; known: {ATTN_IMPLEMENTATIONS}")
    if attn == "flash_attention_2" and torch.device(device).type != "cuda":
        raise ValueError("flash_attention_2 needs a CUDA device")
    return dtype, attn


def _mrope_section(head_dim: int) -> list[int]:
    """Split of the rotary half-dimension into (temporal, height, width), Qwen's 1:1.5:1.5."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def tiny_processor(tokenizer, min_pixels: int, max_pixels: int) -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL processor around ``tokenizer`` with the real Qwen2-VL image processor."""
    size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    image_processor = Qwen2VLImageProcessor(
        size=size, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    video_processor = Qwen2VLVideoProcessor(
        size=size, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )


def tiny_config(tokenizer, sizes: dict[str, Any]) -> Qwen2_5_VLConfig:
    """``Qwen2_5_VLConfig`` of the tiny model for ``tokenizer`` (special-token ids from it)."""
    ids = {
        name: tokenizer.convert_tokens_to_ids(name)
        for name in (
            "<|im_end|>",
            "<|endoftext|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<|vision_start|>",
            "<|vision_end|>",
        )
    }
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    if hidden % heads or (hidden // heads) % 8:
        raise ValueError(
            f"hidden_size {hidden} / num_attention_heads {heads} must be a multiple of 8"
        )
    if sizes["vision_hidden_size"] % sizes["vision_num_heads"]:
        raise ValueError("vision_hidden_size must be a multiple of vision_num_heads")
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": sizes["intermediate_size"],
        "num_hidden_layers": sizes["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": sizes["num_key_value_heads"],
        "max_position_embeddings": sizes["max_position_embeddings"],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(sizes["rope_theta"]),
            "mrope_section": _mrope_section(hidden // heads),
        },
        "bos_token_id": None,
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    depth = sizes["vision_depth"]
    vision_config = {
        "depth": depth,
        "hidden_size": sizes["vision_hidden_size"],
        "intermediate_size": sizes["vision_intermediate_size"],
        "num_heads": sizes["vision_num_heads"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "out_hidden_size": hidden,
        # Qwen2.5-VL alternates windowed and full attention; the last block attends fully.
        "fullatt_block_indexes": [depth - 1],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=bool(sizes["tie_word_embeddings"]),
    )


def _build_tiny(
    tokenizer_corpus: Iterable[str] | None,
    tiny: dict[str, Any] | None,
    dtype: torch.dtype,
    attn: str,
    seed: int,
) -> tuple[PreTrainedModel, Qwen2_5_VLProcessor]:
    unknown = set(tiny or {}) - set(TINY_DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown tiny-model settings {sorted(unknown)}; known: {sorted(TINY_DEFAULTS)}"
        )
    if tokenizer_corpus is None:
        raise ValueError("building the tiny model needs tokenizer_corpus (texts to train BPE on)")
    sizes = {**TINY_DEFAULTS, **(tiny or {})}
    # Every prompt carries the default system prompt: weigh it like a frequent phrase.
    corpus = itertools.chain(tokenizer_corpus, [DEFAULT_SYSTEM_PROMPT] * SYSTEM_PROMPT_WEIGHT)
    tokenizer = build_tokenizer(
        corpus, vocab_size=int(sizes["vocab_size"]), number_tokens=int(sizes["number_tokens"])
    )
    processor = tiny_processor(tokenizer, sizes["min_pixels"], sizes["max_pixels"])
    config = tiny_config(tokenizer, sizes)
    # Seed only the initialisation, without disturbing the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(
            config, attn_implementation=attn, dtype=dtype
        )
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model, processor


# What a model source holds: full weights (an HF model) or PEFT adapters on a base model.
SOURCE_FILES = (("config.json", "model"), ("adapter_config.json", "adapter"))


def _looks_like_hub_id(path: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def resolve_model_source(path: str | Path) -> tuple[str, Literal["model", "adapter"]]:
    """Where ``model.path`` (or a checkpoint) loads from, and what it holds.

    A local folder is used as it is. Anything else must be a Hugging Face hub id
    (``Qwen/Qwen2.5-VL-3B-Instruct``): its ``config.json`` (or, for PEFT adapters,
    ``adapter_config.json``) is looked up in the local HF cache, and downloaded where the network
    allows (not under ``HF_HUB_OFFLINE=1``); ``from_pretrained`` then takes the rest from there.
    A source that is neither raises ``FileNotFoundError`` saying where it looked and how to fix
    it.
    """
    text = str(path)
    local = Path(text).expanduser()
    if local.is_dir():
        for name, kind in SOURCE_FILES:
            if (local / name).is_file():
                return str(local), kind
        raise FileNotFoundError(
            f"model.path={text}: this folder has neither config.json (an HF model) nor "
            "adapter_config.json (PEFT adapters)"
        )
    if not _looks_like_hub_id(text):
        raise FileNotFoundError(
            f"model.path={text}: no such folder (no config.json to load), and not a hub id "
            "such as Qwen/Qwen2.5-VL-3B-Instruct"
        )
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    why = " and downloads are off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else ""
    for name, kind in SOURCE_FILES:
        try:
            hf_hub_download(text, name)
        except LocalEntryNotFoundError:
            if constants.HF_HUB_OFFLINE:
                continue  # not cached: maybe the other kind is
            why = " and the hub could not be reached"
            break  # the next file would wait for the network again
        except EntryNotFoundError:
            continue  # the repository has no such file: try the other kind
        except HfHubHTTPError as err:
            raise FileNotFoundError(
                f"model.path={text}: the hub refused it ({err}). Check the id, or log in "
                "(hf auth login) for a gated or private model, or set model.path to a local "
                "folder"
            ) from err
        return text, kind
    raise FileNotFoundError(
        f"model.path={text}: not a local folder, and the hub model {text!r} is not in the "
        f"Hugging Face cache {constants.HF_HUB_CACHE}{why}. Download it where the network "
        f"allows into that cache (`hf download {text}`; HF_HOME / HF_HUB_CACHE choose the "
        "cache), or set model.path to a local folder with its config.json and weights"
    )


def load_pretrained(
    path: str | Path, dtype: torch.dtype, attn: str
) -> tuple[PreTrainedModel, Any]:
    """Model + processor of ``path`` (``resolve_model_source``): full weights, or adapters merged
    into their base (``geovlm.lora.load_merged``)."""
    source, kind = resolve_model_source(path)
    if kind == "adapter":
        from geovlm.lora import load_merged

        return load_merged(source, dtype, attn)
    config = AutoConfig.from_pretrained(source)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model.path={path}: model_type {config.model_type!r} is not supported; "
            f"known: {SUPPORTED_MODEL_TYPES}"
        )
    model = AutoModelForImageTextToText.from_pretrained(
        source, dtype=dtype, attn_implementation=attn
    )
    processor = AutoProcessor.from_pretrained(source)
    return model, processor


def _set_pixel_budget(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    for sub in (processor.image_processor, getattr(processor, "video_processor", None)):
        if sub is None:
            continue
        if min_pixels is not None:
            sub.size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            sub.size["longest_edge"] = int(max_pixels)


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing of every decoder and vision block.

    transformers 5.x renamed ``gradient_checkpointing_*`` to ``activation_checkpointing_*``
    (the old names warn); use whichever the installed version has.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def disable_checkpointing(model: PreTrainedModel) -> None:
    disable = getattr(model, "activation_checkpointing_disable", None)
    (disable or model.gradient_checkpointing_disable)()


def is_checkpointing(model: PreTrainedModel) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def build_policy(
    path: str | Path | None = None,
    tokenizer_corpus: Iterable[str] | None = None,
    tiny: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    freeze_vision: bool = False,
    seed: int = 0,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[PreTrainedModel, Any]:
    """The trainable policy and its processor.

    With ``path`` None, a tiny Qwen2.5-VL is built from ``tiny`` (overrides of
    ``TINY_DEFAULTS``) with a tokenizer trained on ``tokenizer_corpus``; otherwise the Qwen2-VL /
    Qwen2.5-VL checkpoint ``path`` is loaded: a local folder (a saved tiny model too) or a hub id
    (``resolve_model_source``), holding full weights or PEFT adapters (merged into their base).
    ``dtype`` defaults to bf16 on CUDA and fp32 on CPU, ``attn_implementation`` to flash-attention
    2 when importable on CUDA and SDPA otherwise. ``min_pixels`` / ``max_pixels`` override the
    processor's pixel budget. The model is returned in train mode on ``device``.
    """
    dtype, attn = _resolve(device, dtype, attn_implementation)
    if path is None:
        model, processor = _build_tiny(tokenizer_corpus, tiny, dtype, attn, seed)
    else:
        if tokenizer_corpus is not None or tiny is not None:
            raise ValueError("tokenizer_corpus and tiny only apply when building (path=None)")
        model, processor = load_pretrained(path, dtype, attn)
    _set_pixel_budget(processor, min_pixels, max_pixels)
    model.to(device)
    # Every weight trains (merged adapters come back frozen from PEFT) unless frozen here.
    model.requires_grad_(True)
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    return model, processor


def load_reference_model(
    source: PreTrainedModel | str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A frozen reference model: a deep copy of a live model, or a checkpoint directory.

    Frozen means eval mode, ``requires_grad=False`` everywhere and no gradient checkpointing.
    A copy keeps the source's device and dtype unless ``device`` / ``dtype`` are given.
    """
    if isinstance(source, PreTrainedModel):
        reference = copy.deepcopy(source)
        if dtype is not None:
            reference.to(as_dtype(dtype))
        if device is not None:
            reference.to(device)
    else:
        target = device or "cpu"
        reference, _ = build_policy(
            source, device=target, dtype=dtype, attn_implementation=attn_implementation
        )
    if is_checkpointing(reference):
        disable_checkpointing(reference)
    reference.requires_grad_(False)
    reference.eval()
    return reference


def save_pretrained(model: PreTrainedModel, processor, directory: str | Path) -> Path:
    """Write the model (safetensors) and processor in HF format, loadable by ``build_policy``.

    Not atomic by itself: ``geovlm.checkpoint`` writes into a temporary directory and renames.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a DDP / DeepSpeed wrapper (itself when not wrapped; FSDP2 shards in
    place)."""
    return getattr(model, "module", model)


def lm_head_weight(model: PreTrainedModel) -> torch.Tensor:
    """The ``[V, H]`` output-projection weight (tied to the embeddings when the config ties)."""
    return unwrap(model).get_output_embeddings().weight


def needs_root_forward(model: torch.nn.Module) -> bool:
    """Whether a forward must enter through the model's own ``forward``: a DDP / DeepSpeed
    wrapper synchronises gradients (and ZeRO-3 gathers weights) there, and FSDP2 gathers the
    root's weights (embeddings, final norm, ``lm_head``) only in the root module's forward."""
    if hasattr(model, "module"):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def _model_inputs(batch: dict[str, torch.Tensor], extra: dict) -> dict[str, torch.Tensor]:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return {"use_cache": False, **inputs, **extra}


def forward_hidden(model: PreTrainedModel, batch: dict[str, torch.Tensor], **extra) -> torch.Tensor:
    """Final hidden states ``[B, T, H]``: the policy forward up to, not including, ``lm_head``.

    ``hidden @ lm_head_weight(model).T`` are the logits. Works under gradient checkpointing
    (the decoder layers checkpoint themselves) and ignores a ``labels`` entry; ``extra``
    arguments (a cache, position ids, ``use_cache``) go to the forward.

    Where ``needs_root_forward``, the model runs its full forward with ``logits_to_keep=1`` (one
    position of logits) and the last entry of ``hidden_states``, the same final-norm output, is
    returned; otherwise the model body alone runs.
    """
    inputs = _model_inputs(batch, extra)
    if needs_root_forward(model):
        outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1, return_dict=True)
        return outputs.hidden_states[-1]
    return model.base_model(**inputs, return_dict=True).last_hidden_state


def forward_logits(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    logits_to_keep: int | torch.Tensor = 0,
    **extra,
) -> torch.Tensor:
    """Logits ``[B, T, V]``: ``[B, logits_to_keep, V]`` for the last positions when an int > 0,
    ``[B, K, V]`` at the positions of a 1-D index tensor. ``extra`` as for ``forward_hidden``."""
    inputs = _model_inputs(batch, extra)
    return model(**inputs, logits_to_keep=logits_to_keep, return_dict=True).logits


# --------------------------------------------------------------------------- from a run config


def policy_settings(config: RunConfig, device: torch.device) -> dict[str, Any]:
    """``build_policy`` settings shared by every model a run builds or loads."""
    model_cfg = config.model
    return dict(
        device=device,
        dtype=None if model_cfg.dtype == "auto" else getattr(torch, model_cfg.dtype),
        attn_implementation=None
        if model_cfg.attn_implementation == "auto"
        else model_cfg.attn_implementation,
        gradient_checkpointing=model_cfg.gradient_checkpointing,
        freeze_vision=model_cfg.freeze_vision,
        seed=config.seed,
    )


def load_policy(config: RunConfig, path: str | Path, device: torch.device):
    """Model + processor of an HF checkpoint directory (a stage's ``final/`` or a real model),
    with the kernel patches the config asks for."""
    model, processor = build_policy(path=str(path), **policy_settings(config, device))
    patch_policy(config, model)
    return model, processor


def patch_policy(config: RunConfig, model: PreTrainedModel) -> None:
    """The patches a run's policy gets once its weights are final: Liger's kernels on CUDA
    (``apply_kernel_patches``) and, with ``model.freeze_vision`` on the CPU, the frozen tower's
    per-image output cache (``geovlm.vision_cache``); not with LoRA adapters in the tower, whose
    merge rewrites its weights behind the version counters the cache keys on."""
    apply_kernel_patches(model, liger=config.model.liger_kernels)
    lora = config.model.lora
    if config.model.freeze_vision and not (lora.enabled and lora.vision):
        from geovlm.vision_cache import cache_frozen_vision

        cache_frozen_vision(model)


def initial_policy(
    config: RunConfig, corpus: Iterable[str], device: torch.device, is_main: bool = True
) -> tuple[tuple[PreTrainedModel, Any], Path]:
    """The run's starting policy and the directory it loads from: ``model.path``, else the
    embedded tiny model, built once (tokenizer trained on ``corpus``) and saved as ``init/``."""
    if config.model.path:
        return load_policy(config, config.model.path, device), Path(config.model.path)
    init_dir = config.run_dir / "init"
    if (init_dir / "config.json").is_file():
        return load_policy(config, init_dir, device), init_dir
    model, processor = build_policy(
        tokenizer_corpus=corpus, tiny=asdict(config.model.tiny), **policy_settings(config, device)
    )
    pretrain_scores = _pretrain_tiny_vision(config, model, processor, is_main)
    if is_main:
        from geovlm.checkpoint import save_checkpoint

        save_checkpoint(init_dir, model, processor, config, step=0)
        if pretrain_scores is not None:
            text = json.dumps(pretrain_scores, indent=1) + "\n"
            (init_dir / VISION_PRETRAIN_FILE).write_text(text)
    # The model is init/ from now on (LoRA adapters name it as their base).
    model.name_or_path = str(init_dir.resolve())
    patch_policy(config, model)
    return (model, processor), init_dir


# The read-out scores of the tiny model's vision pretraining, written beside init/'s weights.
VISION_PRETRAIN_FILE = "vision_pretrain.json"


def _pretrain_tiny_vision(
    config: RunConfig, model: PreTrainedModel, processor, is_main: bool
) -> dict[str, float] | None:
    """``model.vision_pretrain`` on the freshly built tiny model: the train split's scene stream
    (``3 * data.seed``) trains the tower, 24 scenes of the val stream score it. Every rank runs
    the same seeded steps, then takes rank 0's tower."""
    settings = config.model.vision_pretrain
    if settings.steps <= 0:
        return None
    from geovlm.data.scenes import generate_scenes
    from geovlm.runtime import is_distributed
    from geovlm.vision_pretrain import pretrain_vision_tower

    seed, size = int(config.data.seed), config.data.image_size
    world = embedded_world(config.data)
    visual = model.model.visual
    frozen = [p for p in visual.parameters() if not p.requires_grad]
    visual.requires_grad_(True)  # model.freeze_vision freezes it for the run, not for this
    try:
        scores = pretrain_vision_tower(
            model,
            processor,
            generate_scenes(3 * seed, config.data.n_train_scenes, size, world),
            generate_scenes(3 * seed + 1, 24, size, world),
            steps=settings.steps,
            lr=settings.lr,
            batch_size=settings.batch_size,
            seed=config.seed,
            progress=is_main,
        )
    finally:
        for p in frozen:
            p.requires_grad_(False)
    if is_distributed():
        # Same seeds, same steps; but GPU kernels need not be bitwise deterministic, and every
        # rank must start from rank 0's tower (FSDP2 does not broadcast it).
        with torch.no_grad():
            for param in visual.parameters():
                torch.distributed.broadcast(param.data, src=0)
    return scores


def apply_kernel_patches(model: PreTrainedModel, liger: bool = True) -> bool:
    """Swap in Liger-Kernel's fused RoPE, RMSNorm and SwiGLU for Qwen2-VL / Qwen2.5-VL.

    Only on CUDA with ``liger_kernel`` installed; otherwise a logged no-op. Liger patches the
    transformers modules process-wide, so this is done once, for GPU runs. The fused linear
    cross-entropy is left off: the losses here call ``geovlm.kernels`` on the hidden states.
    Returns whether kernels were applied.
    """
    model_type = getattr(model.config, "model_type", None)
    reason = None
    if not liger:
        reason = "disabled by the caller"
    elif model.device.type != "cuda":
        reason = f"model is on {model.device.type}, Liger's Triton kernels need CUDA"
    elif importlib.util.find_spec("liger_kernel") is None:
        reason = "liger_kernel is not installed"
    elif model_type not in SUPPORTED_MODEL_TYPES:
        reason = f"no Liger patch for model_type {model_type!r}"
    if reason is not None:
        logger.info("Liger kernels not applied: %s", reason)
        return False
    from liger_kernel.transformers import (
        apply_liger_kernel_to_qwen2_5_vl,
        apply_liger_kernel_to_qwen2_vl,
    )

    patch = (
        apply_liger_kernel_to_qwen2_5_vl
        if model_type == "qwen2_5_vl"
        else apply_liger_kernel_to_qwen2_vl
    )
    patch(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=model,
    )
    logger.info("Liger kernels applied to %s (rope, rms_norm, swiglu)", model_type)
    return True
