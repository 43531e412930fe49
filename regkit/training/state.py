"""Every random state a run can draw from, as plain data a checkpoint can hold.

Exact resume needs the generators of the main process to continue where they stopped: torch's
CPU generator (dropout, drop-path, random initialisations), every CUDA device's, NumPy's and
Python's global ones. The data pipeline draws from per-sample generators keyed by (seed, epoch,
index) instead (:func:`regkit.data.pairs.sample_generator`), so the loader's workers hold no
state that a resume would need.
"""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def rng_state() -> Dict[str, Any]:
    """The global random states (tensors, ints and floats: loads with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # only devices already in use: querying initialises CUDA, which a CPU run should not do
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": int(py_version), "keys": torch.tensor(py_keys, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def set_rng_state(state: Any) -> None:
    """Restore what :func:`rng_state` saved (a bare tensor, as older checkpoints hold, is the
    torch CPU state alone)."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if state.get("numpy"):
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if state.get("python"):
        p = state["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["keys"].tolist()), p["gauss"]))
