"""The GRPO loss options: one frozen object, every default and allowed value defined here once.

``GRPOLossOptions`` is what ``grpo_loss``, ``linear_grpo_loss``, the spec in ``reference.py`` and
the TRL adapter take; ``geovlm.config.StageConfig.loss_options()`` builds it from a training stage.
The names and defaults are those of Liger-Kernel's ``triton_grpo_loss`` (TRL's ``GRPOConfig``
calls ``eps_low`` / ``eps_high`` ``epsilon`` / ``epsilon_high``). Per-call data -- tensors such as
the vLLM importance-sampling ratio, and the token count ``num_items_in_batch`` -- is not an option.

This module imports neither torch nor triton, so configuration code can use it freely.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")
# The loss types that clip the ratio PPO-style (and so log the clip ratios TRL logs).
PPO_CLIP_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# The loss types normalised by the number of completion tokens of the whole batch
# (``num_items_in_batch``; see ``reference.dapo_normalizer``).
TOKEN_NORMALISED_LOSS_TYPES: tuple[str, ...] = ("dapo", "cispo", "vespo")

# Literal types for annotations (configuration fields, signatures), built from the tuples above.
LossType = Literal[LOSS_TYPES]  # type: ignore[valid-type]
ImportanceSamplingLevel = Literal[IMPORTANCE_SAMPLING_LEVELS]  # type: ignore[valid-type]


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming ``name`` and the allowed values unless ``value`` is one."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class GRPOLossOptions:
    """Everything that configures the GRPO loss, validated when built.

    Attributes:
        temperature: the policy's sampling temperature; log-probs are taken of
            ``softmax(logits / temperature)``.
        beta: weight of the k3 KL penalty against the reference policy (0 disables it).
        eps_low, eps_high: the clip range ``[1 - eps_low, 1 + eps_high]`` of the ratio; for
            ``cispo`` ``eps_high`` is the raw upper bound of the (detached) ratio.
        loss_type: one of ``LOSS_TYPES`` (TRL's ``loss_type``; the normalisation).
        importance_sampling_level: ``"token"`` ratios, or one ``"sequence"`` ratio per completion
            (the geometric mean over its tokens, GSPO).
        max_completion_length: ``dr_grpo``'s constant normaliser; None means the batch's L.
        delta: upper clamp of the ratio (two-sided clipping), or None.
        use_bias_correction_kl: multiply the KL term by the ratio.
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's sequence weight.
    """

    temperature: float = 0.9
    beta: float = 0.04
    eps_low: float = 0.2
    eps_high: float = 0.4
    loss_type: LossType = "dapo"
    importance_sampling_level: ImportanceSamplingLevel = "token"
    max_completion_length: int | None = None
    delta: float | None = None
    use_bias_correction_kl: bool = False
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice(
            "importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS
        )
        for name in ("temperature", "sapo_temperature_pos", "sapo_temperature_neg"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("beta", "eps_low", "eps_high", "vespo_k_pos", "vespo_lambda_pos",
                     "vespo_k_neg", "vespo_lambda_neg"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.delta is not None and (not _is_real(self.delta) or not self.delta > 0):
            raise ValueError(f"delta must be None or a positive number, got {self.delta!r}")
        length = self.max_completion_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                                   or length <= 0):
            raise ValueError(
                f"max_completion_length must be None or a positive int, got {length!r}"
            )
        if not isinstance(self.use_bias_correction_kl, bool):
            raise ValueError(
                f"use_bias_correction_kl must be a bool, got {self.use_bias_correction_kl!r}"
            )

    @property
    def normalises_by_batch_tokens(self) -> bool:
        """Whether the loss is divided by the batch's completion-token count
        (``num_items_in_batch``), as dapo / cispo / vespo are."""
        return self.loss_type in TOKEN_NORMALISED_LOSS_TYPES

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> GRPOLossOptions:
        """Options from a mapping of option names (every key must be one; missing ones default)."""
        _check_names(values)
        return cls(**values)

    def replace(self, **changes: Any) -> GRPOLossOptions:
        """A copy with ``changes`` applied (validated); unknown names are a ValueError."""
        return self.from_mapping({**dataclasses.asdict(self), **changes})


DEFAULT_OPTIONS = GRPOLossOptions()


def resolve_options(options: GRPOLossOptions | None, **loose: Any) -> GRPOLossOptions:
    """The options of a call that takes either ``options`` or loose option keywords.

    Without ``options`` the loose keywords build one. With it, each loose keyword must be left at
    its default (``DEFAULT_OPTIONS``): a call that sets both is ambiguous and raises, naming them.
    """
    if options is None:
        return GRPOLossOptions.from_mapping(loose)
    if not isinstance(options, GRPOLossOptions):
        raise TypeError(f"options must be a GRPOLossOptions, got {type(options).__name__}")
    _check_names(loose)
    clashing = sorted(k for k, v in loose.items() if v != getattr(DEFAULT_OPTIONS, k))
    if clashing:
        raise ValueError(
            f"pass the loss options either as options= or as keywords, not both; got options= and "
            f"{clashing}"
        )
    return options


def _check_names(values: Mapping[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(GRPOLossOptions)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown GRPO loss option(s) {unknown}; the options are {sorted(names)}")
