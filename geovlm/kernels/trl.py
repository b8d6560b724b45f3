"""Plug the fused GRPO loss into TRL's ``GRPOTrainer`` (imports trl; ``geovlm.kernels`` does not).

Supported TRL versions: ``>=1.16,<1.17`` (``SUPPORTED_TRL``; the lock pins 1.16, the tests run it).
The adapter replaces ``GRPOTrainer._compute_loss``, a private method whose inputs and scaling
change between TRL minor versions, so any other version is refused when the trainer is set up.

One-line switch: ``from geovlm.kernels.trl import FusedGRPOTrainer as GRPOTrainer``, or
``enable_fused_loss(trainer)`` on a trainer built elsewhere. The training step then takes the
policy's last hidden state (``hidden_states[-1]`` of a forward that computes the logits of one
position only) and runs ``linear_selective_log_softmax`` on it and ``lm_head.weight``: the
Triton kernels on CUDA, so the ``[B, L, V]`` logits never exist, as with TRL 1.16's own fused LM
head. Where the head is not a plain ``hidden @ weight.T + bias`` -- logit soft-capping or scaling
in the model config, or a weight sharded by FSDP / ZeRO-3 -- it asks the model for the logits of
the completion instead and runs ``fused_log_probs`` on them. The loss is
``reference.grpo_loss_from_logps`` with the trainer's options (``loss_options``). Everything
else (generation, rewards, advantages, old / reference log-probs, optimisation) stays TRL's.

What matches TRL: the loss of every ``loss_type`` at both importance-sampling levels, the
scaling for gradient accumulation (``num_items_in_batch`` for dapo / cispo / vespo,
``1 / accumulation steps`` otherwise), and the metric names. Where it differs: with several
processes TRL's token-weighted global metric means become means of per-process means; under bf16
autocast the linear kernel multiplies in the hidden states' dtype where TRL's head follows
autocast, so the two agree to bf16 precision there and to fp32 rounding in fp32. Refused (a
ValueError when the trainer is set up, never silently dropped): the entropy bonus
(``entropy_coef`` / ``use_adaptive_entropy``), top-entropy masking (``top_entropy_quantile <
1``), off-policy sequence masking (``off_policy_mask_threshold``) and the MoE auxiliary loss.
"""

from __future__ import annotations

import types

import torch
import trl
from packaging.specifiers import SpecifierSet
from trl import GRPOTrainer

from . import reference
from .linear_logprobs import linear_selective_log_softmax
from .logprobs import fused_log_probs
from .options import GRPOLossOptions

SUPPORTED_TRL_RANGE = ">=1.16,<1.17"
SUPPORTED_TRL = SpecifierSet(SUPPORTED_TRL_RANGE)
# Model inputs TRL passes through for vision-language models, besides ids and attention mask.
_MODEL_INPUT_KEYS = (
    "pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "spatial_shapes",
    "token_type_ids", "mm_token_type_ids", "image_position_ids",
)
# Text-config fields by which a model scales or caps its logits (TRL's fused head reads these).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                     "lm_head_multiplier", "logits_scaling")


def check_trl_version() -> None:
    """Raise a ValueError unless the installed TRL is in ``SUPPORTED_TRL``."""
    if trl.__version__ not in SUPPORTED_TRL:
        raise ValueError(
            f"geovlm.kernels.trl supports TRL {SUPPORTED_TRL_RANGE} (it replaces the private "
            f"GRPOTrainer._compute_loss); this is TRL {trl.__version__}. Install a supported TRL "
            "or use TRL's GRPOTrainer"
        )


def check_supported(trainer: GRPOTrainer) -> None:
    """Raise a ValueError naming the TRL version, or each option, the adapter does not support."""
    check_trl_version()
    unsupported = []
    if getattr(trainer, "top_entropy_quantile", 1.0) < 1.0:
        unsupported.append("top_entropy_quantile < 1")
    if getattr(trainer, "off_policy_mask_threshold", None) is not None:
        unsupported.append("off_policy_mask_threshold")
    if getattr(trainer, "_entropy_bonus_enabled", False):
        unsupported.append("entropy_coef / use_adaptive_entropy")
    if getattr(trainer, "aux_loss_enabled", False):
        unsupported.append("router_aux_loss_coef (MoE auxiliary loss)")
    if unsupported:
        raise ValueError(
            "geovlm.kernels.trl: the fused GRPO loss does not implement " + ", ".join(unsupported)
            + "; disable these options or use TRL's GRPOTrainer"
        )


def loss_options(trainer: GRPOTrainer) -> GRPOLossOptions:
    """The GRPO loss options of a TRL trainer (its resolved epsilons, its args for the rest)."""
    args = trainer.args
    return GRPOLossOptions(
        temperature=trainer.temperature, beta=trainer.beta, eps_low=trainer.epsilon_low,
        eps_high=trainer.epsilon_high, loss_type=trainer.loss_type,
        importance_sampling_level=trainer.importance_sampling_level,
        max_completion_length=trainer.max_completion_length, delta=args.delta,
        use_bias_correction_kl=args.use_bias_correction_kl,
        sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg, vespo_k_pos=args.vespo_k_pos,
        vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg,
    )


def plain_lm_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, bias)`` of the unwrapped model's LM head when its logits are exactly
    ``hidden @ weight.T + bias`` with the whole weight on this process; else None."""
    text_config = model.config.get_text_config()
    for name in _LOGIT_TRANSFORMS:
        if getattr(text_config, name, None) not in (None, 1, 1.0):
            return None
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    return None if _is_sharded(weight) else (weight, bias)


def _is_sharded(weight: torch.Tensor) -> bool:
    """An FSDP2 parameter (a DTensor) or a DeepSpeed ZeRO-3 one (a local partition)."""
    if hasattr(weight, "ds_numel"):
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(weight, DTensor)


def completion_logps(
    trainer: GRPOTrainer, model: torch.nn.Module, inputs: dict, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable log-probs and (no-grad) entropies ``[B, L]`` of the completion tokens."""
    completion_ids = inputs["completion_ids"]
    seq = completion_ids.size(1)
    model_inputs = dict(
        input_ids=torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
        attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        use_cache=False,
        **{k: inputs[k] for k in _MODEL_INPUT_KEYS if inputs.get(k) is not None},
    )
    backend = getattr(trainer, "fused_loss_backend", "auto")
    head = plain_lm_head(trainer.accelerator.unwrap_model(model))
    if head is not None:
        with trainer.accelerator.autocast():
            # The logits of one position only; the last hidden state is the final norm's output.
            outputs = model(**model_inputs, output_hidden_states=True, logits_to_keep=1)
        # The state at t predicts token t + 1: the L states before the last predict the completion.
        hidden = outputs.hidden_states[-1][:, -(seq + 1):-1]
        weight, bias = head
        if trainer.args.cast_lm_head_to_fp32:
            hidden = hidden.float()
        ids = completion_ids.masked_fill(mask == 0, 0)  # padding ids are never looked up
        logps, entropy = linear_selective_log_softmax(
            hidden, weight, ids, bias, trainer.temperature, return_entropy=True, backend=backend
        )
        return logps, entropy.detach()
    with trainer.accelerator.autocast():
        # One extra position: the logits at t predict token t + 1, the last one is dropped.
        logits = model(**model_inputs, logits_to_keep=seq + 1).logits
    return fused_log_probs(
        logits, completion_ids, mask, trainer.temperature,
        inplace=getattr(trainer, "fused_loss_inplace", True), return_entropy=True,
        backend=backend,
    )


def fused_compute_loss(self: GRPOTrainer, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Drop-in for ``GRPOTrainer._compute_loss`` (TRL ``SUPPORTED_TRL``) on the fused kernels."""
    completion_mask = inputs["completion_mask"]
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    logps, entropy = completion_logps(self, model, inputs, mask)

    mode = "train" if self.model.training else "eval"
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    num_items = inputs["num_items_in_batch"]
    if mode == "train":
        # TRL counts num_items_in_batch over the generation batch: one accumulation window's share.
        num_items = num_items * accumulation / self.args.steps_per_generation
    vllm_ratio = None
    if self.loss_type == "vespo" or (self.use_vllm and self.vllm_importance_sampling_correction):
        vllm_ratio = inputs.get("importance_sampling_ratio")
    options = loss_options(self)
    loss, metrics = reference.grpo_loss_from_logps(
        logps, inputs.get("old_per_token_logps"),
        inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
        inputs["advantages"], mask, options, vllm_is_ratio=vllm_ratio,
        num_items_in_batch=num_items,
    )
    if not options.normalises_by_batch_tokens:
        loss = loss / accumulation

    fmask = mask.to(entropy.dtype)
    metrics["entropy"] = (entropy * fmask).sum() / fmask.sum().clamp(min=1.0)
    for name, value in metrics.items():
        gathered = self.accelerator.gather(value.float().reshape(1))
        if name == "clip_ratio/low_min":
            finite = gathered[~torch.isnan(gathered)]
            value = finite.min() if finite.numel() else gathered[0]
        elif name == "clip_ratio/high_max":
            finite = gathered[~torch.isnan(gathered)]
            value = finite.max() if finite.numel() else gathered[0]
        else:
            value = gathered.nanmean()
        self._metrics[mode][name].append(value.item())
    return loss


def enable_fused_loss(
    trainer: GRPOTrainer, backend: str = "auto", inplace: bool = True
) -> GRPOTrainer:
    """Make an existing ``GRPOTrainer`` compute its loss with the fused kernels; returns it.
    ``inplace`` applies to the logits path (the gradient is written into the logits)."""
    check_supported(trainer)
    trainer.fused_loss_backend = backend
    trainer.fused_loss_inplace = inplace
    trainer._compute_loss = types.MethodType(fused_compute_loss, trainer)
    return trainer


class FusedGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is the fused kernels'; takes TRL's arguments plus ``backend``
    (``"auto"``, ``"triton"``, ``"torch"``) and ``inplace`` (the logits path writes the gradient
    into the logits)."""

    def __init__(self, *args, backend: str = "auto", inplace: bool = True, **kwargs):
        check_trl_version()  # before TRL builds the models and datasets
        super().__init__(*args, **kwargs)
        check_supported(self)
        self.fused_loss_backend = backend
        self.fused_loss_inplace = inplace

    _compute_loss = fused_compute_loss
