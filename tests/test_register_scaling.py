"""The split registration's scaling benchmark (regkit.registration.scaling): the memory model and
the largest cube for a budget, the table, merged runs, and one real run end to end (tiny)."""
from __future__ import annotations

import math

import pytest

from regkit.errors import InputError
from regkit.registration.scaling import GiB, Run, fit_memory, largest_cube, markdown, merge, run_benchmark


def fake_run(size, processes, per_voxel=200.0, fixed=0.1 * GiB, halo=11, start=0.25 * GiB):
    lo = [math.ceil(size / processes) + (2 * halo if processes > 1 else 0)] * processes
    held = [min(size, h) for h in lo]
    peaks = [int(start + fixed + per_voxel * size * size * h) for h in held]
    levels = [{"level": 1, "shape": [size] * 3, "iterations": 2, "seconds": 4.0, "comm_seconds": 0.2 * (processes > 1),
               "halo": halo}]
    return Run(size=size, processes=processes, wall_seconds=10.0 / processes, levels=levels, held_rows=held,
               halo=halo, rss_start_bytes=[int(start)] * processes, peak_bytes=peaks, memory_kind="VmHWM",
               comm_seconds=[1.0] * processes)


def results(runs):
    machine = {"device": "cpu", "device_name": "test CPU", "torch_version": "x", "date": "2026-01-01",
               "load_average": 0.0}
    return {"machine": machine, "preset": "accurate", "overrides": {"affine": None}, "device": "cpu", "halo": 11,
            "runs": [{**r.__dict__, "above_start": r.above_start} for r in runs]}


def test_memory_model_and_largest_cube():
    runs = [fake_run(s, n) for s in (64, 96) for n in (1, 2, 4)]
    a, b = fit_memory(runs)
    assert a == pytest.approx(0.1 * GiB, rel=1e-6) and b == pytest.approx(200.0, rel=1e-6)
    n = largest_cube(16 * GiB, 4, (a, b), 0.25 * GiB, 11)
    used = 0.25 * GiB + a + b * n * n * (math.ceil(n / 4) + 22)
    bigger = 0.25 * GiB + a + b * (n + 16) ** 2 * (math.ceil((n + 16) / 4) + 22)
    assert n % 16 == 0 and used <= 16 * GiB < bigger
    assert largest_cube(16 * GiB, 4, (a, b), 0.25 * GiB, 11) > largest_cube(16 * GiB, 1, (a, b), 0.25 * GiB, 11)
    assert fit_memory([fake_run(64, 1)]) is None  # one point: no model


def test_table_and_merge():
    text = markdown(results([fake_run(64, 1, fixed=0), fake_run(64, 2, fixed=0)]), budgets_gib=(16,),
                    command="python x.py")
    assert "| 64³ | 2 | 54 of 64 |" in text and "1.00× of" in text and "| 16 GiB |" in text
    merged = merge([results([fake_run(64, 1)]), results([fake_run(96, 1), fake_run(64, 1, per_voxel=300)])])
    assert [(r["size"], r["processes"]) for r in merged["runs"]] == [(64, 1), (96, 1)]
    assert merged["runs"][0]["peak_bytes"] == fake_run(64, 1, per_voxel=300).peak_bytes  # the later one
    other = results([fake_run(64, 1)])
    other["preset"] = "fast"
    with pytest.raises(InputError, match="cannot merge"):
        merge([results([fake_run(64, 1)]), other])


@pytest.mark.slow  # a fresh Python process and a synthetic pair: ~10 s on 2 busy cores
def test_one_tiny_run_end_to_end(tmp_path):
    res = run_benchmark([32], [1], tmp_path, iterations=[1, 1, 1], log=lambda m: None)
    (run,) = res["runs"]
    assert run["ok"], run["error"]
    assert run["processes"] == 1 and run["held_rows"] == [32] and run["peak_bytes"][0] > run["rss_start_bytes"][0]
    assert [lv["iterations"] for lv in run["levels"]] == [1, 1, 1] and run["levels"][-1]["shape"] == [32, 32, 32]
    assert "| 32³ | 1 | 32 of 32 |" in markdown(res)
