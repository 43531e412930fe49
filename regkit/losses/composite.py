"""A training loss as a weighted sum of named registry terms.

``configs/loss/<name>.yaml`` builds one of these. Each term's raw value is reported under its
name (logged as ``train/loss/<name>``) together with the weighted ``total``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from regkit.errors import InputError
from regkit.losses.registry import LOSSES
from regkit.metrics import one_hot
from regkit.models.base import RegistrationOutput
from regkit.spatial import warp

INPUT_KINDS = ("images", "flow", "labels", "keypoints")


@dataclass
class LossOutput:
    """``total`` = sum of ``weights[k] * terms[k]``; ``terms`` are the unweighted values."""

    total: Tensor
    terms: Dict[str, Tensor] = field(default_factory=dict)
    weights: Dict[str, float] = field(default_factory=dict)


def _build_term(key: str, spec: Any) -> nn.Module:
    """A term given as a module, a registry name, or ``None`` (the key is the registry name)."""
    if isinstance(spec, nn.Module):
        return spec
    if spec is None or isinstance(spec, str):
        return LOSSES.create(spec or key)
    raise InputError(
        f"loss term '{key}': 'loss' must be a loss module, a registry name or omitted, got {type(spec).__name__}"
    )


class CompositeLoss(nn.Module):
    """Weighted sum of named loss terms, called as ``loss(output, batch) -> LossOutput``.

    Args:
        terms: ``{name: {"weight": w, "loss": term}}``. ``term`` is a loss module (what
            ``_target_`` configs instantiate to), a registry name, or omitted, in which case
            ``name`` itself is looked up in the registry, so a term can be added from the
            command line with ``+loss.terms.bending.weight=0.1``. Other keys of a term built by
            name are passed to ``create_loss``.

    What each term receives follows its ``inputs`` attribute (see ``regkit.losses.registry``):
    similarity terms get ``(output.warped, batch["fixed"])``; regularisers get ``output.field``
    (the velocity for diffeomorphic models, else the flow; for a cascade the sum over its
    ``stage_fields``), or ``output.flow`` (the composed displacement) when the term sets
    ``uses_displacement = True`` (``folding``); label terms get the one-hot moving
    labels warped linearly by ``output.flow`` and the one-hot fixed labels, for the label
    values in the term's ``labels`` attribute; keypoint terms (``keypoints``) get ``output.flow``
    and the batch's ``fixed_keypoints``, ``moving_keypoints``, ``keypoints_mask`` and
    ``moving_spacing`` (mm; else ``spacing``), see :class:`regkit.data.keypoints.KeypointPairDataset`.
    """

    def __init__(self, terms: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__()
        if not terms:
            raise InputError("CompositeLoss needs at least one term")
        self.terms = nn.ModuleDict()
        self.weights: Dict[str, float] = {}
        for key, spec in terms.items():
            spec = dict(spec) if spec is not None else {}
            weight = spec.pop("weight", 1.0)
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise InputError(f"loss term '{key}': weight must be a number, got {weight!r}") from None
            if not math.isfinite(weight):
                raise InputError(f"loss term '{key}': weight must be finite, got {weight}")
            module = spec.pop("loss", None)
            if spec and isinstance(module, nn.Module):
                raise InputError(f"loss term '{key}': unexpected options {sorted(spec)} next to a built loss")
            self.terms[key] = LOSSES.create(module or key, **spec) if spec else _build_term(key, module)
            if getattr(self.terms[key], "inputs", None) not in INPUT_KINDS:
                raise InputError(f"loss term '{key}': {type(self.terms[key]).__name__} has no valid 'inputs' kind")
            self.weights[key] = weight
        if "total" in self.terms:
            raise InputError("'total' is reserved for the weighted sum; rename that loss term")

    def forward(self, output: RegistrationOutput, batch: Mapping[str, Tensor]) -> LossOutput:
        values: Dict[str, Tensor] = {}
        total: Optional[Tensor] = None
        for key, term in self.terms.items():
            weight = self.weights[key]
            with torch.set_grad_enabled(torch.is_grad_enabled() and weight != 0):
                value = self._evaluate(key, term, output, batch)
            values[key] = value
            if weight != 0:
                total = weight * value if total is None else total + weight * value
        if total is None:
            total = output.flow.sum() * 0.0
        return LossOutput(total=total, terms=values, weights=dict(self.weights))

    @staticmethod
    def _evaluate(key: str, term: nn.Module, output: RegistrationOutput, batch: Mapping[str, Tensor]) -> Tensor:
        if term.inputs == "images":
            return term(output.warped, batch["fixed"])
        if term.inputs == "flow":
            if getattr(term, "uses_displacement", False):
                return term(output.flow)
            if output.stage_fields:  # a cascade: smoothness per stage, summed
                return torch.stack([term(f) for f in output.stage_fields]).sum()
            return term(output.field)
        if term.inputs == "keypoints":
            for need in ("fixed_keypoints", "moving_keypoints"):
                if batch.get(need) is None:
                    raise InputError(f"loss term '{key}' needs keypoints, but the batch has no '{need}' "
                                     f"(a Learn2Reg dataset JSON that lists keypoint files)")
            spacing = batch.get("moving_spacing", batch.get("spacing"))
            return term(output.flow, batch["fixed_keypoints"], batch["moving_keypoints"], batch.get("keypoints_mask"),
                        spacing)
        for need in ("moving_label", "fixed_label"):
            if batch.get(need) is None:
                raise InputError(f"loss term '{key}' needs label maps, but the batch has no '{need}'")
        labels = term.labels
        moving = one_hot(batch["moving_label"], labels, dtype=output.flow.dtype)
        fixed = one_hot(batch["fixed_label"], labels, dtype=output.flow.dtype)
        return term(warp(moving, output.flow, mode="bilinear"), fixed)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {w:g}" for k, w in self.weights.items())
