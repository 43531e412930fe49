"""Label supervision: soft Dice between warped and fixed one-hot label maps (``dice``).

Called ``loss(warped_onehot, fixed_onehot)``; inside a :class:`~regkit.losses.CompositeLoss` the
one-hot maps are built from the batch's ``moving_label`` / ``fixed_label`` for the term's
``labels`` and the moving one is warped linearly, so the term is differentiable in the flow.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from regkit.errors import InputError
from regkit.losses.lncc import check_image_pair, computes_in_float32
from regkit.losses.registry import LOSSES

# The 30 FreeSurfer structures evaluated on IXI (TransMorph's protocol). The synthetic dataset's
# 20 labels are among them, so the default works there too; other datasets need their own list.
IXI_LABELS = (2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31, 41, 42, 43, 46, 47, 49, 50,
              51, 52, 53, 54, 60, 63)


def check_labels(labels: Optional[Sequence[int]], name: str) -> tuple:
    if labels is None or isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__"):
        raise InputError(f"{name}: labels must be a non-empty list of label values, got {labels!r}")
    labels = tuple(labels)
    if not labels or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise InputError(f"{name}: labels must be a non-empty list of integer label values, got {list(labels)!r}")
    if len(set(labels)) != len(labels):
        raise InputError(f"{name}: labels must be distinct, got {list(labels)!r}")
    return labels


class Dice(nn.Module):
    """``1 - mean soft Dice`` over the label channels present.

    For batch item ``b`` and label channel ``k``, with ``p`` the warped (soft) one-hot map and
    ``q`` the fixed one: ``D_bk = 2 sum(p q) / (sum(p) + sum(q))`` over the voxels. A label absent
    from both maps (``sum(p) + sum(q) = 0``) is skipped rather than scored 0 or 1, as in
    :func:`regkit.metrics.dice`; the loss is ``1 - mean`` of the remaining ``D_bk`` (0 when none
    remains). Dimensionless, in [0, 1]; 0 for a perfect overlap.

    Args:
        labels: the label values (e.g. FreeSurfer IDs) whose one-hot channels the term receives,
            in channel order. Default: the 30 structures of the IXI evaluation
            (:data:`IXI_LABELS`). Background (0) is normally left out.
    """

    inputs = "labels"

    def __init__(self, labels: Sequence[int] = IXI_LABELS) -> None:
        super().__init__()
        self.labels = check_labels(labels, "Dice")

    @computes_in_float32
    def forward(self, warped: Tensor, fixed: Tensor) -> Tensor:
        check_image_pair(warped, fixed, "Dice")
        if warped.shape[1] != len(self.labels):
            raise InputError(
                f"Dice: expected one-hot maps (B, {len(self.labels)}, *spatial) for {len(self.labels)} labels, "
                f"got shape {tuple(warped.shape)}"
            )
        dims = tuple(range(2, warped.dim()))
        inter = (warped * fixed).sum(dim=dims)
        size = warped.sum(dim=dims) + fixed.sum(dim=dims)
        present = size > 0
        if not bool(present.any()):
            return warped.sum() * 0.0  # nothing to compare; keeps the graph
        dice = 2 * inter[present] / size[present]
        return 1 - dice.mean()

    def extra_repr(self) -> str:
        return f"labels={list(self.labels)}"


@LOSSES.register
def dice(labels: Sequence[int] = IXI_LABELS) -> Dice:
    return Dice(labels=labels)
