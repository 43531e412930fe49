"""The registration benchmark: its reduced mode runs end to end (no peers), its evaluation is the
metrics module's, and the peers' coordinate read-back is exact."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from regkit.data.resample import resample_to_grid
from regkit.errors import InputError
from regkit.models import create_model
from regkit.registration import benchmark, peers
from regkit.checkpoint import model_spec, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_reduced_benchmark_runs_and_writes_json_and_markdown(real_data, tmp_path):
    out_md, out_json = tmp_path / "benchmarks.md", tmp_path / "register.json"
    out_md.write_text("# Benchmarks\n\nintro\n")
    # an untrained network (its prediction is about the identity): the network + refine rows
    net = create_model("vxm1")
    ckpt = save_checkpoint(tmp_path / "net.pt", {"model": model_spec(net), "state_dict": net.state_dict()})
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_register.py"), "--reduced", "--data", str(real_data),
           "--presets", "fast", "--pairs", "subj2->subj1", "oasis B->A", "--threads", "1",
           "--json", str(out_json), "--out", str(out_md), "--checkpoint", str(ckpt), "--refine", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out_json.read_text())
    env = results["environment"]
    assert {"date", "torch", "device", "load_average", "threads", "cpu"} <= set(env)
    rows = {(r["pair"], r["method"]): r for r in results["rows"]}
    methods = ["identity (aligned input)", "regkit fast", "regkit network", "regkit network + refine"]
    assert set(rows) == {(p, m) for p in ("subj2->subj1", "oasis B->A") for m in methods}
    for pair in ("subj2->subj1", "oasis B->A"):
        ident, fast = rows[(pair, "identity (aligned input)")], rows[(pair, "regkit fast")]
        assert ident["nonpos_jac_pct"] == 0 and ident["sdlogj"] == 0
        assert fast["dice"] > ident["dice"]  # a few iterations already help
        assert fast["nonpos_jac_pct"] == 0
        assert fast["iterations"] == 7
        assert rows[(pair, "regkit network + refine")]["iterations"] == 2
    text = out_md.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert "<!-- bench_register:start -->" in text and "| regkit fast |" in text and "REDUCED" in text


def test_identity_dice_of_the_full_size_pair_is_the_readme_figure(real_data):
    pair = benchmark.real_pairs(real_data, names=["subj2->subj1"])[0]
    flow = torch.zeros(1, 3, *pair.fixed.shape[2:])
    assert benchmark.evaluate(pair, flow)["dice"] == pytest.approx(0.611, abs=5e-4)


def test_bad_benchmark_options(real_data):
    with pytest.raises(InputError, match="Unknown benchmark pair"):
        benchmark.real_pairs(real_data, names=["subj3->subj1"])
    with pytest.raises(InputError, match="peer-python"):
        benchmark.run_benchmark(real_data, peers=["elastix"], peer_python=None)
    with pytest.raises(InputError, match="Unknown peer method 'ants'"):
        benchmark.run_benchmark(real_data, peers=["ants"], peer_python=sys.executable)


def test_peer_coordinate_images_read_back_the_identity(tmp_path):
    """Resampling the padded coordinate images onto the moving grid itself gives each voxel's
    own index: the read-back used for every peer tool is exact (linear function, linear
    interpolation), also for an oblique header."""
    shape = (9, 10, 11)
    affine = np.array([[0.0, -1.2, 0.1, 30], [1.1, 0.0, 0.0, -20], [0.0, 0.2, 1.3, 5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.random.rand(*shape).astype(np.float32), affine), tmp_path / "m.nii.gz")
    paths = peers.coordinate_images(str(tmp_path / "m.nii.gz"), str(tmp_path))
    expected = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    for k, p in enumerate(paths):
        img = nib.load(p)
        assert img.shape == tuple(n + 2 * peers.PAD for n in shape)
        data = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float64))[None, None]
        back = resample_to_grid(data, img.affine, affine, shape)[0, 0].numpy()
        np.testing.assert_allclose(back, expected[k], atol=1e-4)  # the header stores float32


def test_merge_keeps_one_row_per_pair_and_method_and_checks_targets():
    env = {"date": "d", "cpu": "c", "cores": 2, "threads": 2, "torch": "t", "device": "cpu", "load_average": [1, 1, 1]}

    def row(pair, method, d, s=10.0):
        return {"pair": pair, "method": method, "dice": d, "nonpos_jac_pct": 0.0, "sdlogj": 0.1, "seconds": s,
                "cpu_seconds": s, "iterations": None, "note": ""}

    a = {"environment": env, "rows": [row("p", "identity (aligned input)", 0.5), row("p", "regkit fast", 0.7, 5),
                                      row("p", "regkit accurate", 0.8, 40)]}
    b = {"environment": env, "rows": [row("p", "identity (aligned input)", 0.5), row("p", "elastix", 0.72, 60),
                                      row("p", "fireants", 0.81, 100)]}
    merged = benchmark.merge([a, b])
    assert [r["method"] for r in merged["rows"]] == ["identity (aligned input)", "regkit fast", "regkit accurate",
                                                     "elastix", "fireants"]
    assert [e["methods"] for e in merged["runs"]] == [["regkit fast", "regkit accurate"], ["elastix", "fireants"]]
    text = benchmark.markdown(merged)
    assert "| p | fast vs elastix | Dice 0.7000 vs 0.7200 NOT met" in text
    assert "Dice 0.8000 vs 0.8100 (fireants) NOT met; 0.40 of fireants's wall" in text
    # a method measured again in an earlier-listed run is credited to that run only; pairs are named
    c = {"environment": env, "rows": [row("p", "regkit fast", 0.6, 9), row("q", "regkit fast", 0.6, 9),
                                      row("q", "elastix", 0.6, 9)]}
    merged = benchmark.merge([a, c])
    assert [e["methods"] for e in merged["runs"]] == [["regkit fast", "regkit accurate"], ["regkit fast, elastix (q)"]]
    assert [(r["pair"], r["method"], r["dice"]) for r in merged["rows"] if r["method"] == "regkit fast"] == [
        ("p", "regkit fast", 0.7), ("q", "regkit fast", 0.6)]
    with pytest.raises(InputError, match="no benchmark results"):
        benchmark.merge([])
