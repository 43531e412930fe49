"""Evaluation metrics on label maps and deformation fields.

Label maps are integer tensors ``(B, 1, *spatial)`` or ``(B, *spatial)`` holding label values
(e.g. FreeSurfer IDs), not class indices.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from regkit.errors import InputError


def _squeeze_labels(label_map: Tensor) -> Tensor:
    if label_map.dim() >= 4 and label_map.shape[1] == 1:
        return label_map[:, 0]
    return label_map


def one_hot(label_map: Tensor, labels: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """``(B, len(labels), *spatial)``: channel k is 1 where ``label_map == labels[k]``."""
    lm = _squeeze_labels(label_map)
    values = torch.as_tensor(list(labels), device=lm.device)
    shape = (1, -1) + (1,) * (lm.dim() - 1)
    return (lm.unsqueeze(1) == values.to(lm.dtype).view(shape)).to(dtype)


def dice(pred: Tensor, target: Tensor, labels: Sequence[int]) -> Tensor:
    """Per-label Dice ``2|A∩B| / (|A| + |B|)``, shape ``(B, len(labels))``.

    A label absent from both maps gives NaN, so that averages (``torch.nanmean``) skip it
    instead of counting a perfect or a zero score for a structure that is not there.
    """
    p, t = _squeeze_labels(pred), _squeeze_labels(target)
    if p.shape != t.shape:
        raise InputError(f"dice: label maps must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    if len(labels) == 0:
        raise InputError("dice: no labels to evaluate")
    b = p.shape[0]
    p, t = p.reshape(b, -1), t.reshape(b, -1)
    out = torch.empty(b, len(labels), dtype=torch.float64, device=p.device)
    for k, lab in enumerate(labels):
        a, c = p == lab, t == lab
        inter = (a & c).sum(1).double()
        size = a.sum(1).double() + c.sum(1).double()
        out[:, k] = torch.where(size > 0, 2 * inter / size.clamp_min(1), torch.full_like(size, float("nan")))
    return out


def mean_dice(pred: Tensor, target: Tensor, labels: Sequence[int]) -> Tensor:
    """Mean Dice over the labels present, per batch item ``(B,)``."""
    return torch.nanmean(dice(pred, target, labels), dim=1)
