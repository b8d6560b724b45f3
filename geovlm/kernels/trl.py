"""Plug the fused GRPO loss into TRL's ``GRPOTrainer`` (imports trl; ``geovlm.kernels`` does not).

One-line switch: ``from geovlm.kernels.trl import FusedGRPOTrainer as GRPOTrainer``, or
``enable_fused_loss(trainer)`` on a trainer built elsewhere. The training step then runs the
policy forward to logits ``[B, L + 1, V]`` and computes log-probs, entropy and the loss with
``fused_log_probs`` (one Triton pass forward, one backward, the gradient written into the logits)
and ``reference.grpo_loss_from_logps`` (TRL's loss math). Everything else (generation, rewards,
advantages, old / reference log-probs, optimisation) stays TRL's.

The step is TRL's ``_compute_loss``: same loss for every ``loss_type``, same scaling for gradient
accumulation (``num_items_in_batch`` for dapo / cispo / vespo, ``1 / accumulation steps``
otherwise), and the same metric names. With several processes TRL's token-weighted global means
become means of per-process means. Under bf16 autocast the logits, and so their gradient, are bf16
(as with Liger's loss), whereas TRL's own fused LM head keeps that tile in fp32: the two paths then
agree to bf16 precision, and exactly (to fp32 rounding) in fp32. Options outside the GRPO loss
itself (entropy bonus, top-entropy masking, off-policy sequence masking, MoE auxiliary loss) are
refused when the trainer is set up rather than silently dropped.
"""

from __future__ import annotations

import types

import torch
from trl import GRPOTrainer

from . import reference
from .grpo_loss import fused_log_probs

# Model inputs TRL passes through for vision-language models, besides ids and attention mask.
_MODEL_INPUT_KEYS = (
    "pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "spatial_shapes",
    "token_type_ids", "mm_token_type_ids", "image_position_ids",
)
# Loss types whose normaliser TRL does not rescale through num_items_in_batch.
_PER_STEP_NORMALISED = ("grpo", "sapo", "bnpo", "dr_grpo", "luspo")


def check_supported(trainer: GRPOTrainer) -> None:
    """Raise a ValueError naming each TRL option the fused loss does not implement."""
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


def fused_compute_loss(self: GRPOTrainer, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Drop-in for ``GRPOTrainer._compute_loss`` that runs the fused loss on the logits."""
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    seq = completion_ids.size(1)
    extra = {k: inputs[k] for k in _MODEL_INPUT_KEYS if inputs.get(k) is not None}
    with self.accelerator.autocast():
        # One extra position: the logits at t predict token t + 1, the last one is dropped.
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       logits_to_keep=seq + 1, use_cache=False, **extra).logits
    logps, entropy = fused_log_probs(
        logits, completion_ids, mask, self.temperature,
        inplace=getattr(self, "fused_loss_inplace", True), return_entropy=True,
        backend=getattr(self, "fused_loss_backend", "auto"),
    )

    mode = "train" if self.model.training else "eval"
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    num_items = inputs["num_items_in_batch"]
    if mode == "train":
        # TRL counts num_items_in_batch over the generation batch: one accumulation window's share.
        num_items = num_items * accumulation / self.args.steps_per_generation
    vllm_ratio = None
    if self.loss_type == "vespo" or (self.use_vllm and self.vllm_importance_sampling_correction):
        vllm_ratio = inputs.get("importance_sampling_ratio")
    args = self.args
    loss, metrics = reference.grpo_loss_from_logps(
        logps, inputs.get("old_per_token_logps"),
        inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
        inputs["advantages"], mask,
        beta=self.beta, eps_low=self.epsilon_low, eps_high=self.epsilon_high,
        loss_type=self.loss_type, importance_sampling_level=self.importance_sampling_level,
        max_completion_length=self.max_completion_length, delta=args.delta,
        use_bias_correction_kl=args.use_bias_correction_kl, vllm_is_ratio=vllm_ratio,
        num_items_in_batch=num_items, sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg, vespo_k_pos=args.vespo_k_pos,
        vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg,
    )
    if self.loss_type in _PER_STEP_NORMALISED:
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
    """Make an existing ``GRPOTrainer`` compute its loss with the fused kernel; returns it."""
    check_supported(trainer)
    trainer.fused_loss_backend = backend
    trainer.fused_loss_inplace = inplace
    trainer._compute_loss = types.MethodType(fused_compute_loss, trainer)
    return trainer


class FusedGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is the fused kernel; takes TRL's arguments plus ``backend``
    (``"auto"``, ``"triton"``, ``"torch"``) and ``inplace`` (write the gradient into the logits)."""

    def __init__(self, *args, backend: str = "auto", inplace: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        check_supported(self)
        self.fused_loss_backend = backend
        self.fused_loss_inplace = inplace

    _compute_loss = fused_compute_loss
