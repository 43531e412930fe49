"""Label supervision: soft Dice between warped and fixed one-hot label maps (``dice``).

Called ``loss(warped_onehot, fixed_onehot)``; inside a :class:`~regkit.losses.CompositeLoss` the
one-hot maps are built from the batch's ``moving_label`` / ``fixed_label`` for the term's
``labels`` and the moving one is warped linearly, so the term is differentiable in the flow.
"""
from __future__ import annotations

from typing import Sequence, Union

from torch import Tensor, nn

from regkit.errors import InputError
from regkit.losses.lncc import check_image_pair, computes_in_float32
from regkit.losses.registry import LOSSES
from regkit.metrics import LABEL_SETS, resolve_labels


def check_labels(labels: Union[None, str, Sequence[int]], name: str) -> tuple:
    """A label-set name of :data:`regkit.metrics.LABEL_SETS` (``"ixi"``) or a non-empty list of
    distinct integer label values -> tuple of ints."""
    if isinstance(labels, str):
        try:
            return resolve_labels(labels)
        except InputError as err:
            raise InputError(f"{name}: {err}") from None
    if labels is None or isinstance(labels, bytes) or not hasattr(labels, "__iter__"):
        raise InputError(f"{name}: labels must be a non-empty list of label values or the name of a label set "
                         f"({', '.join(LABEL_SETS)}), got {labels!r}")
    labels = tuple(labels)
    if not labels or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise InputError(f"{name}: labels must be a non-empty list of integer label values, got {list(labels)!r}")
    if len(set(labels)) != len(labels):
        raise InputError(f"{name}: labels must be distinct, got {list(labels)!r}")
    return labels


@LOSSES.register(name="dice")
class Dice(nn.Module):
    """``1 - mean soft Dice`` over the label channels present.

    For batch item ``b`` and label channel ``k``, with ``p`` the warped (soft) one-hot map and
    ``q`` the fixed one: ``D_bk = 2 sum(p q) / (sum(p) + sum(q))`` over the voxels. A label absent
    from both maps (``sum(p) + sum(q) = 0``) is skipped rather than scored 0 or 1, as in
    :func:`regkit.metrics.dice`; the loss is ``1 - mean`` of the remaining ``D_bk`` (0 when none
    remains). Dimensionless, in [0, 1]; 0 for a perfect overlap.

    Args:
        labels: the label values (e.g. FreeSurfer IDs) whose one-hot channels the term receives,
            in channel order, or the name of a label set of :data:`regkit.metrics.LABEL_SETS`.
            Default ``"ixi"``: the 30 structures of the IXI evaluation
            (:data:`regkit.metrics.IXI_LABELS`; the synthetic dataset's 20 labels are among
            them). Background (0) is normally left out.
    """

    inputs = "labels"

    def __init__(self, labels: Union[str, Sequence[int]] = "ixi") -> None:
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
