"""One path from a trained network to a field: :class:`Predictor`.

A predictor is a registration network together with what it needs to register scans it has
not seen: the intensity normalisation it was trained with, the grid size it saw, and the labels
its runs evaluate. Validation during training, ``regkit-evaluate``, ``regkit-register`` and
instance optimisation all predict through it, so resizing and normalisation happen in one place.

    predictor = Predictor.from_checkpoint("outputs/.../best.ckpt")   # reads the file once
    out = predictor(moving, fixed)   # (B, C, *spatial) each, any size -> RegistrationOutput at that size

When the input size differs from the training size, the network sees the pair resampled to the
training size (corner voxel centres kept, :func:`regkit.data.resample.resize_volume`) and the
field is resampled back with its vectors rescaled (:func:`regkit.spatial.resize_flow`);
``shape_policy="native"`` runs the fully convolutional network at the input size instead and
``"reject"`` refuses.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from tqdm.auto import tqdm

from regkit.checkpoint import load_checkpoint, model_from_checkpoint
from regkit.data.pairs import NORMALIZATIONS, normalize_intensity
from regkit.data.resample import resize_volume
from regkit.device import resolve_device
from regkit.errors import InputError, check_choice
from regkit.losses.composite import CompositeLoss
from regkit.metrics import resolve_groups, resolve_labels
from regkit.models.base import RegistrationOutput
from regkit.spatial import resize_flow

SHAPE_POLICIES = ("resample", "native", "reject")
INTENSITY_POLICIES = ("rescale", "error", "keep")


@dataclass
class TrainingSpec:
    """How the training data was prepared, as a checkpoint records it (``Trainer.state_dict``
    stores the data module's ``spec()`` under ``"data"``).

    Attributes:
        normalize: intensity normalisation of every image (``regkit.data.pairs.NORMALIZATIONS``).
        shape: the grid size the network saw, or ``None`` when unknown.
        eval_labels: label values its validation Dice averaged over (``None``: all present).
        label_groups: ``{name: labels}`` groups reported beside them (e.g. the IXI 17).
        intensity: ``(low, high)``, the 0.5th and 99.5th intensity percentiles of the training
            images after normalisation, or ``None`` for checkpoints that do not record it.
    """

    normalize: str = "none"
    shape: Optional[Tuple[int, ...]] = None
    eval_labels: Optional[Tuple[int, ...]] = None
    label_groups: Optional[Dict[str, Tuple[int, ...]]] = None
    intensity: Optional[Tuple[float, float]] = None

    def __post_init__(self) -> None:
        check_choice("normalisation", self.normalize, NORMALIZATIONS)
        self.shape = tuple(int(s) for s in self.shape) if self.shape else None
        self.eval_labels = resolve_labels(self.eval_labels) if self.eval_labels is not None else None
        self.label_groups = resolve_groups(self.label_groups) or None
        self.intensity = tuple(float(v) for v in self.intensity) if self.intensity else None

    @classmethod
    def from_checkpoint(cls, data: Mapping[str, Any]) -> "TrainingSpec":
        """From a loaded checkpoint: its ``data`` record, written by every regkit trainer.

        A checkpoint without one (a data module without ``spec()``) falls back to its dataset
        config, where ``resize`` or ``shape`` give the size and ``normalize`` defaults to
        ``minmax``, :class:`regkit.data.PairData`'s default.
        """
        record = dict(data.get("data") or {})
        if not record:
            ds = (data.get("config") or {}).get("dataset") or {}
            record = {"normalize": ds.get("normalize", "minmax"), "shape": ds.get("resize") or ds.get("shape"),
                      "eval_labels": ds.get("eval_labels"), "label_groups": ds.get("label_groups")}
        return cls(normalize=record.get("normalize") or "minmax", shape=record.get("shape"),
                   eval_labels=record.get("eval_labels"), label_groups=record.get("label_groups") or None,
                   intensity=record.get("intensity"))

    def to_dict(self) -> Dict[str, Any]:
        return {"normalize": self.normalize, "shape": list(self.shape) if self.shape else None,
                "eval_labels": list(self.eval_labels) if self.eval_labels else None,
                "label_groups": {k: list(v) for k, v in (self.label_groups or {}).items()} or None,
                "intensity": list(self.intensity) if self.intensity else None}


@dataclass
class FinetuneRecord:
    """What :meth:`Predictor.finetune` did (``register.json`` keeps it)."""

    steps: int
    lr: float
    loss_first: float
    loss_final: float
    terms_dropped: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


class Predictor:
    """A network plus its training spec; ``predictor(moving, fixed)`` registers a pair of any size.

    Args:
        model: a :class:`~regkit.models.RegistrationModel` (built through the registry when the
            predictor should be saved or reloaded).
        spec: the :class:`TrainingSpec` (normalisation, training size, labels).
        shape_policy: input size != training size: ``resample`` (default), ``native`` or ``reject``.
        autocast_dtype: run the network under ``torch.autocast`` with this dtype (``None``: fp32),
            as the trainer does; the field and the warping stay float32.
        checkpoint: the loaded checkpoint dict when built by :meth:`from_checkpoint` (its config
            holds the training loss that :meth:`finetune` optimises).
        source: where it came from (a path), for messages and records.
    """

    def __init__(self, model: nn.Module, spec: Optional[TrainingSpec] = None, shape_policy: str = "resample",
                 autocast_dtype: Optional[torch.dtype] = None, checkpoint: Optional[Dict[str, Any]] = None,
                 source: Optional[str] = None) -> None:
        check_choice("shape policy", shape_policy, SHAPE_POLICIES)
        self.model = model
        self.spec = spec or TrainingSpec()
        self.shape_policy = shape_policy
        self.autocast_dtype = autocast_dtype
        self.checkpoint = checkpoint or {}
        self.source = source
        self.notes: List[str] = []  # what the last call did to sizes, for the user

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path, device: Any = "cpu", shape_policy: str = "resample") -> "Predictor":
        """Read ``path`` once (plain data, ``weights_only=True``), rebuild the model through the
        registry, and keep the checkpoint's training spec and config."""
        data = load_checkpoint(path)
        model = model_from_checkpoint(data).to(resolve_device(device)).eval()
        return cls(model, TrainingSpec.from_checkpoint(data), shape_policy, checkpoint=data, source=str(path))

    @property
    def name(self) -> str:
        """The model's registry name (``?`` for a model built outside the registry)."""
        spec = getattr(self.model, "regkit_spec", None) or self.checkpoint.get("model") or {}
        return spec.get("name", "?")

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def ndim(self) -> int:
        return int(getattr(self.model, "ndim", 3))

    # -- preparing scans --------------------------------------------------------------------------
    def normalize(self, image: np.ndarray) -> np.ndarray:
        """A raw scan's intensities as the training images had them (float32)."""
        return normalize_intensity(np.asarray(image, dtype=np.float32), self.spec.normalize).astype(np.float32)

    def check_intensity(self, image: np.ndarray, name: str, policy: str = "rescale") -> Tuple[np.ndarray, Optional[str]]:
        """A normalised scan against the training intensity range (``spec.intensity``).

        A scan whose robust range (0.5th-99.5th percentile) reaches further than one training
        range beyond it on either side, e.g. uint8 scans (0-255) given to a network trained on
        [0, 1] with ``normalize: none``, is out of range. Then ``policy``: ``rescale`` maps its
        robust range linearly onto the training range (the documented fallback; returns a note),
        ``error`` refuses in one line saying what to pass, ``keep`` leaves it (returns a note).
        Returns the image to use and the note, if any.
        """
        check_choice("intensity policy", policy, INTENSITY_POLICIES)
        if self.spec.intensity is None:
            return image, None
        lo, hi = self.spec.intensity
        span = max(hi - lo, 1e-6)
        a, b = (float(v) for v in np.percentile(image, [0.5, 99.5]))
        if lo - span <= a and b <= hi + span:
            return image, None
        what = (f"{name}: intensities [{a:.4g}, {b:.4g}] after the recorded normalisation '{self.spec.normalize}' lie "
                f"far outside the training range [{lo:.4g}, {hi:.4g}]")
        if policy == "error":
            raise InputError(f"{what}; pass --intensity rescale to map them onto the training range, or normalise the "
                             f"scans as the training data were")
        if policy == "keep":
            return image, f"{what}; kept as they are (--intensity keep)"
        scaled = (image - a) / max(b - a, 1e-12) * (hi - lo) + lo
        return scaled.astype(np.float32), f"{what}; rescaled linearly onto it (--intensity rescale)"

    def prepare(self, images: Tensor) -> Tensor:
        """Raw images ``(B, C, *spatial)`` normalised as in training, each image on its own
        (float32, on the CPU: the normalisations work on NumPy arrays)."""
        out = [torch.from_numpy(self.normalize(x.detach().cpu().numpy())) for x in images.reshape(-1, *images.shape[2:])]
        return torch.stack(out).reshape(images.shape)

    def network_shape(self, shape: Sequence[int]) -> Tuple[int, ...]:
        """The grid size the network runs at for inputs of ``shape`` (the shape policy)."""
        shape = tuple(int(s) for s in shape)
        trained = self.spec.shape
        if trained is None or tuple(trained) == shape or self.shape_policy == "native":
            return shape
        if self.shape_policy == "reject":
            raise InputError(f"input shape {shape} differs from the training shape {trained} "
                             f"(use shape policy 'resample' or 'native')")
        return tuple(trained)

    # -- predicting -------------------------------------------------------------------------------
    def autocast(self):
        dev = self.device.type
        return torch.autocast(dev, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def forward(self, moving: Tensor, fixed: Tensor) -> RegistrationOutput:
        """The network's output on the input grid, with gradients (for instance optimisation);
        :meth:`__call__` is the no-grad, eval-mode form."""
        full = tuple(moving.shape[2:])
        net = self.network_shape(full)
        self.notes = []
        if net != full:
            self.notes.append(f"network input resampled {full} -> {net} (training size); field resampled back")
        elif self.spec.shape is not None and tuple(self.spec.shape) != full:
            self.notes.append(f"network run at the input size {full} (trained at {self.spec.shape})")
        m_in, f_in = resize_volume(moving, net), resize_volume(fixed, net)
        with self.autocast():
            out = self.model(m_in, f_in)
        if net == full:
            return out
        flow = resize_flow(out.flow, full)
        velocity = resize_flow(out.velocity, full) if out.velocity is not None else None
        warp = getattr(self.model, "transformer", None)
        warped = warp(moving, flow) if warp is not None else None
        return RegistrationOutput(warped=warped, flow=flow, velocity=velocity)

    @torch.no_grad()
    def __call__(self, moving: Tensor, fixed: Tensor) -> RegistrationOutput:
        """Register ``moving`` to ``fixed``, ``(B, C, *spatial)`` each on the predictor's device,
        already normalised (:meth:`normalize`). Returns the output on the input grid: ``flow``
        ``(B, ndim, *spatial)`` in voxels of that grid, ``warped = warp(moving, flow)``."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.forward(moving, fixed)
        finally:
            self.model.train(was_training)

    # -- instance optimisation of the weights ---------------------------------------------------
    def training_loss(self) -> CompositeLoss:
        """The checkpoint's training loss without its label terms (a pair being registered has
        no labels to train on; the labels only score the result)."""
        cfg = (self.checkpoint.get("config") or {}).get("loss")
        if not cfg:
            raise InputError(f"{self.source}: the checkpoint holds no loss config, needed for instance optimisation")
        trained = instantiate(cfg)  # the run's CompositeLoss (the stored config is plain, resolved data)
        kept = {k: {"weight": trained.weights[k], "loss": t} for k, t in trained.terms.items() if t.inputs != "labels"}
        loss = CompositeLoss(kept)
        loss.dropped = [k for k in trained.terms if k not in kept]
        return loss

    def finetune(self, moving: Tensor, fixed: Tensor, steps: int, lr: float = 1e-3,
                 progress: bool = True) -> FinetuneRecord:
        """Adapt the network's weights in place to one pair: ``steps`` Adam steps on the
        checkpoint's training loss (images only) at the size the network sees.

        The model stays in eval mode (no dropout or drop-path noise while fitting one pair).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"finetune steps must be an integer >= 1, got {steps!r}")
        if not lr > 0:
            raise InputError(f"finetune lr must be > 0, got {lr}")
        loss_fn = self.training_loss().to(moving.device)
        net = self.network_shape(moving.shape[2:])
        m_in, f_in = resize_volume(moving, net), resize_volume(fixed, net)
        batch = {"moving": m_in, "fixed": f_in}
        self.model.eval()
        opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        values: List[float] = []
        t0 = time.perf_counter()
        for _ in tqdm(range(steps), desc="instance optimisation", unit="step", disable=not progress):
            with torch.enable_grad():
                with self.autocast():
                    out = self.model(m_in, f_in)
                losses = loss_fn(out, batch)
                if not torch.isfinite(losses.total.detach()):
                    raise InputError(f"instance optimisation: non-finite loss after {len(values)} steps; "
                                     f"lower the learning rate (now {lr:g})")
                opt.zero_grad(set_to_none=True)
                losses.total.backward()
            opt.step()
            values.append(float(losses.total.detach()))
        with torch.no_grad(), self.autocast():
            final = float(loss_fn(self.model(m_in, f_in), batch).total)
        return FinetuneRecord(steps=steps, lr=lr, loss_first=values[0], loss_final=final,
                              terms_dropped=list(loss_fn.dropped), seconds=time.perf_counter() - t0)


def identity_output(moving: Tensor, fixed: Tensor) -> RegistrationOutput:
    """The unregistered pair as an output (zero flow): the 'before' of every comparison."""
    flow = torch.zeros(moving.shape[0], moving.dim() - 2, *moving.shape[2:], device=moving.device)
    return RegistrationOutput(warped=moving, flow=flow)
