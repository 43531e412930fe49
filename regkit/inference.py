"""NIfTI in, NIfTI out: register a moving scan to a fixed scan with a trained checkpoint.

``scripts/register.py`` and the console command ``regkit-register`` call :func:`main`; Python
code calls :func:`register_files`. Every output is written on the FIXED image's voxel grid with
its affine and (NIfTI) header:

* ``warped.nii.gz``: the moving image (original intensities) resampled by the deformation;
* ``flow_voxel.nii.gz``: the displacement in voxels, ``(X, Y, Z, 1, 3)`` (NIfTI vector intent),
  component k along array axis k: ``warped(x) = moving(x + u(x))``;
* ``flow_mm.nii.gz``: the same displacement in millimetres in the fixed image's world frame
  (NIfTI RAS+): ``u_mm(x) = A @ u_vox(x)`` with ``A`` the 3×3 part of the fixed affine, so an
  LIA or oblique scan gets correctly rotated and flipped vectors (ITK/ANTs use LPS: negate the
  first two components there);
* ``jacdet.nii.gz``: the Jacobian determinant of ``x + u(x)`` (volume ratio; <= 0 is folding);
* ``warped_label.nii.gz`` (with ``--moving-label``): the label map warped (nearest by default);
* ``register.json``: inputs, options, the label interpolation and the metrics.

Inputs of another size than the network was trained at are resampled to the training size for
the network and the field is resampled back (``--shape-policy resample``, default); ``native``
runs the fully convolutional network at the input size, ``reject`` refuses. A moving scan on
another grid than the fixed one is first resampled onto the fixed grid through the two affines
(``--moving-grid world``, default; the scans must be roughly aligned in world space, e.g. by an
affine pre-registration); ``voxel`` ignores the headers and requires equal sizes.

``--finetune-steps N`` (instance optimisation) first adapts a copy of the network to this one
pair: N Adam steps on the checkpoint's own training loss (images only, never the labels), at
the size the network sees. The checkpoint file is not changed. It trades seconds per pair for
accuracy where a network generalises poorly, e.g. after training on a handful of subjects.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from regkit.data.io import Volume, atomic_write, load_volume, save_nifti
from regkit.data.module import affine_mismatch
from regkit.data.pairs import NORMALIZATIONS, normalize_intensity
from regkit.data.resample import resample_to_grid, resize_volume
from regkit.device import resolve_device
from regkit.errors import InputError, check_choice
from regkit.evaluation import LABEL_MODES, warp_labels
from regkit.metrics import dice, jacobian_metrics, resolve_labels
from regkit.spatial import jacobian_determinant, resize_flow, warp

log = logging.getLogger("regkit")
SHAPE_POLICIES = ("resample", "native", "reject")
MOVING_GRIDS = ("world", "voxel")
OUTPUTS = ("warped", "flow_voxel", "flow_mm", "jacdet", "warped_label")


def _same_grid(a: Volume, b: Volume) -> bool:
    return a.data.shape == b.data.shape and np.allclose(a.affine, b.affine, atol=1e-3, rtol=0)


def _check_label(image: Volume, label: Optional[Volume]) -> None:
    if label is None:
        return
    if label.data.shape != image.data.shape:
        raise InputError(f"label map {label.path} has shape {label.data.shape} but its image {image.path} has {image.data.shape}")
    message = affine_mismatch(image.path, image.affine, label.path, label.affine)
    if message:
        raise InputError(message.replace(" (dataset.affine_check=warn to proceed anyway)", ""))


def training_spec(ckpt: dict) -> Dict[str, object]:
    """``{"normalize", "shape", "eval_labels"}`` of the run a checkpoint came from (its ``data``
    record, else its dataset config)."""
    spec = dict(ckpt.get("data") or {})
    ds = (ckpt.get("config") or {}).get("dataset") or {}
    normalize = spec.get("normalize") or ds.get("normalize") or "minmax"
    shape = spec.get("shape") or ds.get("resize") or ds.get("shape")
    if normalize not in NORMALIZATIONS:
        raise InputError(f"checkpoint records an unknown normalisation '{normalize}'")
    return {"normalize": normalize, "shape": tuple(int(s) for s in shape) if shape else None,
            "eval_labels": spec.get("eval_labels") or ds.get("eval_labels")}


@torch.no_grad()
def register_files(checkpoint, moving, fixed, out_dir, moving_label=None, fixed_label=None,
                   shape_policy: str = "resample", moving_grid: str = "world", label_mode: str = "nearest",
                   labels=None, device: str = "auto", finetune_steps: int = 0,
                   finetune_lr: float = 1e-3, progress: bool = True) -> Dict[str, object]:
    """Register ``moving`` to ``fixed`` and write the outputs listed in the module docstring.

    Every input is read and checked, and every output computed, before the first file is
    written; each file is written atomically. Returns the record also saved as
    ``register.json`` (paths, options, metrics).
    """
    from regkit.training.checkpoint import load_checkpoint, load_model

    check_choice("shape policy", shape_policy, SHAPE_POLICIES)
    check_choice("moving grid", moving_grid, MOVING_GRIDS)
    check_choice("label_mode", label_mode, LABEL_MODES)
    if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
        raise InputError(f"finetune_steps must be an integer >= 0, got {finetune_steps!r}")
    if not finetune_lr > 0:
        raise InputError(f"finetune_lr must be > 0, got {finetune_lr}")
    start = time.perf_counter()
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    model = load_model(checkpoint).to(dev).eval()
    spec = training_spec(ckpt)

    mov = load_volume(moving, np.float32)
    fix = load_volume(fixed, np.float32)
    mlab = load_volume(moving_label, np.int64, label=True) if moving_label else None
    flab = load_volume(fixed_label, np.int64, label=True) if fixed_label else None
    _check_label(mov, mlab)
    _check_label(fix, flab)
    if mov.data.ndim != model.ndim:
        raise InputError(f"{moving}: {mov.data.ndim}-D volume, the model registers {model.ndim}-D images")
    notes = []

    # 1. the moving scan onto the fixed grid
    mov_t = torch.from_numpy(np.ascontiguousarray(mov.data))[None, None]
    mov_n = torch.from_numpy(normalize_intensity(mov.data, spec["normalize"]).astype(np.float32))[None, None]
    mlab_t = torch.from_numpy(np.ascontiguousarray(mlab.data))[None, None] if mlab is not None else None
    if not _same_grid(mov, fix):
        if moving_grid == "voxel":
            if mov.data.shape != fix.data.shape:
                raise InputError(f"moving {moving} has shape {mov.data.shape} but fixed {fixed} has {fix.data.shape}; "
                                 f"use --moving-grid world to resample it through the affines")
            notes.append("moving and fixed affines differ; headers ignored (--moving-grid voxel)")
        else:
            args = (mov.affine, fix.affine, fix.data.shape)
            mov_t = resample_to_grid(mov_t, *args)
            mov_n = resample_to_grid(mov_n, *args)
            if mlab_t is not None:
                mlab_t = resample_to_grid(mlab_t, *args, mode="nearest")
            notes.append(f"moving {mov.data.shape} resampled onto the fixed grid {fix.data.shape} through the affines")
    fix_n = torch.from_numpy(normalize_intensity(fix.data, spec["normalize"]).astype(np.float32))[None, None]

    # 2. the size the network sees
    full = tuple(fix.data.shape)
    net_shape = spec["shape"]
    if net_shape is not None and tuple(net_shape) != full:
        if shape_policy == "reject":
            raise InputError(f"{fixed}: shape {full} differs from the training shape {tuple(net_shape)} "
                             f"(use --shape-policy resample or native)")
        if shape_policy == "native":
            notes.append(f"network run at the input size {full} (trained at {tuple(net_shape)})")
            net_shape = full
        else:
            notes.append(f"network input resampled {full} -> {tuple(net_shape)} (training size); field resampled back")
    else:
        net_shape = full
    m_in = resize_volume(mov_n, net_shape).to(dev)
    f_in = resize_volume(fix_n, net_shape).to(dev)
    finetune = finetune_pair(model, ckpt, checkpoint, m_in, f_in, finetune_steps, finetune_lr, progress) \
        if finetune_steps else None
    t0 = time.perf_counter()
    with torch.no_grad():
        flow = model(m_in, f_in).flow.double()
    net_seconds = time.perf_counter() - t0
    flow = resize_flow(flow, full).cpu()

    # 3. outputs on the fixed grid
    warped = warp(mov_t.double(), flow)[0, 0].float().numpy()
    det = jacobian_determinant(flow)[0]
    jac = {k: float(v[0]) for k, v in jacobian_metrics(flow).items()}
    a3 = fix.affine[:3, :3]
    u_vox = flow[0].permute(1, 2, 3, 0).numpy()                   # (X, Y, Z, 3)
    u_mm = u_vox @ a3.T                                           # A @ u per voxel
    record: Dict[str, object] = {
        "checkpoint": str(checkpoint), "model": ckpt["model"]["name"], "moving": str(moving), "fixed": str(fixed),
        "moving_label": str(moving_label) if moving_label else None, "fixed_label": str(fixed_label) if fixed_label else None,
        "normalize": spec["normalize"], "training_shape": list(spec["shape"]) if spec["shape"] else None,
        "network_shape": list(net_shape), "shape_policy": shape_policy, "moving_grid": moving_grid,
        "label_mode": label_mode if mlab is not None else None, "notes": notes, "device": str(dev),
        "finetune": finetune, **jac,
    }
    arrays = {"warped": (warped.astype(np.float32), None, "warped moving image"),
              "flow_voxel": (u_vox[:, :, :, None, :].astype(np.float32), "vector", "displacement, voxels, axis k"),
              "flow_mm": (u_mm[:, :, :, None, :].astype(np.float32), "vector", "displacement, mm, world RAS"),
              "jacdet": (det.float().numpy(), None, "Jacobian determinant of x+u(x)")}
    if mlab_t is not None:
        present = [int(v) for v in torch.unique(mlab_t) if v != 0]
        wl = warp_labels(mlab_t, flow, present, label_mode)
        arrays["warped_label"] = (wl[0, 0].numpy().astype(np.int32), None, f"warped labels ({label_mode})")
        if flab is not None:
            eval_labels = resolve_labels(labels) if labels is not None else resolve_labels(spec["eval_labels"])
            if not eval_labels:
                eval_labels = [int(v) for v in np.unique(flab.data) if v != 0]
            target = torch.from_numpy(flab.data)[None, None]
            record["labels"] = list(eval_labels)
            record["dice_before"] = float(torch.nanmean(dice(mlab_t, target, eval_labels)))
            record["dice"] = float(torch.nanmean(dice(wl, target, eval_labels)))
    record["seconds_network"] = net_seconds
    record["seconds_total"] = time.perf_counter() - start

    out = Path(out_dir)
    header = fix.header if fix.path is not None and str(fix.path).endswith((".nii", ".nii.gz")) else None
    written = {}
    for name, (arr, intent, description) in arrays.items():
        written[name] = str(save_nifti(out / f"{name}.nii.gz", arr, fix.affine, header=header, intent=intent,
                                       description=description))
    record["outputs"] = written
    atomic_write(out / "register.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))
    return record


def finetune_pair(model: torch.nn.Module, ckpt: dict, checkpoint, moving: torch.Tensor, fixed: torch.Tensor,
                  steps: int, lr: float, progress: bool = True) -> Dict[str, object]:
    """Adapt ``model`` in place to one pair: ``steps`` Adam steps on the checkpoint's training loss.

    Only image and flow terms are used (a label term, e.g. ``dice``, would need the labels that
    are being predicted, and is left out). Returns the loss before and after, for the record.
    """
    from hydra.utils import instantiate
    from tqdm.auto import tqdm

    from regkit.losses.composite import CompositeLoss

    cfg = (ckpt.get("config") or {}).get("loss")
    if not cfg:
        raise InputError(f"{checkpoint}: the checkpoint holds no loss config, needed by --finetune-steps")
    trained = instantiate(cfg)  # the run's CompositeLoss (the stored config is plain, resolved data)
    dropped = [k for k, t in trained.terms.items() if t.inputs == "labels"]
    loss_fn = CompositeLoss({k: {"weight": trained.weights[k], "loss": t}
                             for k, t in trained.terms.items() if k not in dropped}).to(moving.device)
    model.eval()  # deterministic: no dropout / drop-path noise while fitting one pair
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batch = {"moving": moving, "fixed": fixed}
    values = []
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc="instance optimisation", unit="step", disable=not progress):
        with torch.enable_grad():  # register_files runs under no_grad
            losses = loss_fn(model(moving, fixed), batch)
            if not torch.isfinite(losses.total.detach()):
                raise FloatingPointError(f"--finetune-steps: non-finite loss after {len(values)} steps; lower --finetune-lr")
            opt.zero_grad(set_to_none=True)
            losses.total.backward()
        opt.step()
        values.append(float(losses.total.detach()))
    with torch.no_grad():
        final = float(loss_fn(model(moving, fixed), batch).total)
    return {"steps": steps, "lr": lr, "loss_first": values[0], "loss_final": final, "terms_dropped": dropped,
            "seconds": time.perf_counter() - t0}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from regkit.cli import exit_on_user_error

    parser = argparse.ArgumentParser(
        prog="regkit-register",
        description="Register a moving NIfTI/MGH scan to a fixed one with a trained regkit checkpoint. "
                    "Outputs (on the fixed grid, with the fixed affine and header): warped, flow_voxel, "
                    "flow_mm, jacdet[, warped_label], register.json.")
    parser.add_argument("checkpoint")
    parser.add_argument("moving")
    parser.add_argument("fixed")
    parser.add_argument("-o", "--out", required=True, help="output folder")
    parser.add_argument("--moving-label", default=None, help="label map of the moving scan (warped too)")
    parser.add_argument("--fixed-label", default=None, help="label map of the fixed scan (Dice before/after)")
    parser.add_argument("--labels", default=None,
                        help="labels for Dice: 'ixi' or comma-separated values (default: the checkpoint's, else all)")
    parser.add_argument("--label-mode", default="nearest", choices=LABEL_MODES)
    parser.add_argument("--shape-policy", default="resample", choices=SHAPE_POLICIES,
                        help="input size != training size: resample (default), native or reject")
    parser.add_argument("--moving-grid", default="world", choices=MOVING_GRIDS,
                        help="moving on another grid: world (resample through the affines, default) or voxel")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="instance optimisation: adapt the network to this pair first (Adam steps on the "
                             "training loss, images only; default 0 = off)")
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="learning rate of --finetune-steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    labels = args.labels
    if labels and labels != "ixi":
        try:
            labels = [int(v) for v in labels.split(",")]
        except ValueError:
            parser.error(f"--labels must be 'ixi' or comma-separated integers, got {args.labels!r}")

    @exit_on_user_error
    def run():
        r = register_files(args.checkpoint, args.moving, args.fixed, args.out, args.moving_label, args.fixed_label,
                           args.shape_policy, args.moving_grid, args.label_mode, labels, args.device,
                           args.finetune_steps, args.finetune_lr)
        if r["finetune"]:
            f = r["finetune"]
            print(f"instance optimisation: {f['steps']} steps, loss {f['loss_first']:.4f} -> {f['loss_final']:.4f} "
                  f"({f['seconds']:.1f} s)")
        for note in r["notes"]:
            print(f"note: {note}")
        if "dice" in r:
            print(f"Dice over {len(r['labels'])} labels ({r['label_mode']} label warping): "
                  f"{r['dice_before']:.4f} before -> {r['dice']:.4f} after")
        print(f"% voxels with det J <= 0: {r['nonpos_jac_pct']:.4f}   SD log det J: {r['sdlogj']:.4f}")
        print(f"network {r['seconds_network']:.2f} s, total {r['seconds_total']:.2f} s on {r['device']}")
        for name, path in r["outputs"].items():
            print(f"{name:13s} {path}")

    run()
    return 0
