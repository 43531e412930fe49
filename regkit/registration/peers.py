"""Peer registration tools for the benchmark (ANTs, elastix, FireANTs), run in a subprocess.

This file is a standalone script: it imports no regkit module, only the standard library,
numpy, nibabel and (inside each runner) the peer package, so that it runs under ANOTHER
Python environment (``--peer-python``) where the peers are installed, e.g.::

    /path/to/peers-venv/bin/python regkit/registration/peers.py --method ants_cc \\
        --moving m.nii.gz --fixed f.nii.gz --out result.npz --threads 2

It writes ``result.npz`` with ``coords`` ``(3, *fixed)`` float32: for each fixed voxel ``x`` the
MOVING voxel index ``x + u(x)`` the tool samples (regkit's flow is ``coords - x``), and
``seconds`` (wall time of the registration call alone, files excluded), ``method``,
``version``.

How the coordinates are read back, the same way for every tool: the tool's own "apply
transform" resamples three coordinate images (voxel index along axis k of the moving grid),
linearly. Linear interpolation of a linear function is exact, so this gives the tool's map
without relying on its field's conventions (LPS vs RAS, index vs physical units). The
coordinate images lie on the moving grid padded by ``PAD`` voxels on every side (same spacing
and orientation, origin moved), so that points mapped slightly outside the moving image still
get their true coordinate.

Settings (facts from each tool's code/docs; see docs/registration.md):

* ``ants_cc`` / ``ants_mattes``: ``ants.registration(type_of_transform="SyNOnly")`` with antspy's
  defaults (grad_step 0.2, flow_sigma 3, total_sigma 0, reg_iterations (40, 20, 0)) and
  ``syn_metric="CC"``, ``syn_sampling=4`` (the CC radius of antsRegistrationSyN.sh), or
  ``syn_metric="mattes"``, ``syn_sampling=32`` (bins; antspy's default).
* ``elastix``: ``itk.elastix_registration_method`` with elastix's default ``bspline`` parameter
  map (``GetDefaultParameterMap("bspline")``), no affine stage.
* ``fireants``: ``GreedyRegistration`` with the settings of FireANTs' brain-MRI (LPBA40)
  script: scales (4, 2, 1), iterations (200, 100, 50), ``loss_type="cc"``, cc kernel 7,
  ``smooth_grad_sigma=2``, ``smooth_warp_sigma=0.5``, Adam lr 0.5, compositive.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

PAD = 16
METHODS = ("ants_cc", "ants_mattes", "elastix", "fireants")


def coordinate_images(moving_path: str, folder: str):
    """Write three float32 NIfTI coordinate images of the padded moving grid; their paths."""
    img = nib.load(moving_path)
    shape = img.shape[:3]
    shift = np.eye(4)
    shift[:3, 3] = -PAD
    affine = img.affine @ shift
    axes = [np.arange(-PAD, n + PAD, dtype=np.float32) for n in shape]
    grids = np.meshgrid(*axes, indexing="ij")
    paths = []
    for k, g in enumerate(grids):
        p = os.path.join(folder, f"coord{k}.nii.gz")
        nib.save(nib.Nifti1Image(np.ascontiguousarray(g), affine), p)
        paths.append(p)
    return paths


def float_copy(path: str, folder: str, name: str) -> str:
    """The image as float32 NIfTI (the tools' readers differ on float64 and on .mgz)."""
    img = nib.load(path)
    out = os.path.join(folder, name)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine), out)
    return out


def run_ants(moving: str, fixed: str, coords, metric: str, threads: int):
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants

    f, m = ants.image_read(fixed), ants.image_read(moving)
    sampling = 4 if metric == "CC" else 32
    start = time.perf_counter()
    reg = ants.registration(f, m, type_of_transform="SyNOnly", syn_metric=metric, syn_sampling=sampling)
    seconds = time.perf_counter() - start
    out = [ants.apply_transforms(f, ants.image_read(c), reg["fwdtransforms"], interpolator="linear").numpy()
           for c in coords]
    return np.stack(out), seconds, getattr(ants, "__version__", "?")


def run_elastix(moving: str, fixed: str, coords, threads: int):
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    f = itk.imread(fixed, itk.F)
    m = itk.imread(moving, itk.F)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
    # ITK loads its wrapped modules lazily on first use; load them before the clock starts.
    _ = itk.elastix_registration_method, itk.transformix_filter, itk.ElastixRegistrationMethod
    start = time.perf_counter()
    # Threads through ITK's global default only: passing number_of_threads=2 to
    # elastix_registration_method crashed it (SIGSEGV on the 160x192x224 pair; itk 5.4.7,
    # itk-elastix 0.25.4), the global setting did not.
    _, result = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False)
    seconds = time.perf_counter() - start
    # Linear resampling of the coordinate images, outside value irrelevant (padded grid).
    result.SetParameter(0, "FinalBSplineInterpolationOrder", "1")
    result.SetParameter(0, "ResampleInterpolator", "FinalLinearInterpolator")
    out = []
    for c in coords:
        warped = itk.transformix_filter(itk.imread(c, itk.F), result, log_to_console=False)
        out.append(itk.array_from_image(warped).transpose(2, 1, 0).copy())  # a copy (views die with the image); itk is z, y, x
    version = getattr(itk, "__version__", "?")
    try:
        from importlib.metadata import version as pkg_version

        version = f"itk {version}, itk-elastix {pkg_version('itk-elastix')}"
    except Exception:
        pass
    return np.stack(out), seconds, version


def run_fireants(moving: str, fixed: str, coords, threads: int):
    import torch

    torch.set_num_threads(threads)
    from fireants.io.image import BatchedImages, Image
    from fireants.registration.greedy import GreedyRegistration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    f = BatchedImages([Image.load_file(fixed, device=device)])
    m = BatchedImages([Image.load_file(moving, device=device)])
    start = time.perf_counter()
    reg = GreedyRegistration(scales=[4, 2, 1], iterations=[200, 100, 50], fixed_images=f, moving_images=m,
                             loss_type="cc", cc_kernel_size=7, deformation_type="compositive",
                             smooth_grad_sigma=2, smooth_warp_sigma=0.5, optimizer="adam", optimizer_lr=0.5)
    reg.optimize()
    seconds = time.perf_counter() - start
    out = []
    for c in coords:
        cm = BatchedImages([Image.load_file(c, device=device)])
        with torch.no_grad():
            out.append(reg.evaluate(f, cm).detach().cpu().numpy()[0, 0].transpose(2, 1, 0))  # SimpleITK order z, y, x
    try:
        from importlib.metadata import version as pkg_version

        version = pkg_version("fireants")
    except Exception:
        version = "?"
    return np.stack(out), seconds, f"fireants {version}, torch {torch.__version__}, {device}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--moving", required=True)
    parser.add_argument("--fixed", required=True)
    parser.add_argument("--out", required=True, help="result .npz")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        moving = float_copy(args.moving, tmp, "moving.nii.gz")
        fixed = float_copy(args.fixed, tmp, "fixed.nii.gz")
        coords = coordinate_images(moving, tmp)
        if args.method.startswith("ants"):
            out, seconds, version = run_ants(moving, fixed, coords, "CC" if args.method == "ants_cc" else "mattes",
                                             args.threads)
        elif args.method == "elastix":
            out, seconds, version = run_elastix(moving, fixed, coords, args.threads)
        else:
            out, seconds, version = run_fireants(moving, fixed, coords, args.threads)
    dest = Path(args.out)
    tmp_out = dest.with_name(dest.name + ".tmp.npz")
    np.savez(tmp_out, coords=out.astype(np.float32), seconds=seconds, method=args.method, version=str(version))
    os.replace(tmp_out, dest)
    print(json.dumps({"method": args.method, "seconds": seconds, "version": str(version)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
