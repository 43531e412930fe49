"""Checkpoints as plain data, written atomically and read without running code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts, loaded with
``torch.load(..., weights_only=True)``: unpickling it cannot execute code. The model is rebuilt
through the model registry from ``{"name", "kwargs"}``, never from an import path stored in
the file.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from regkit.data.io import PathLike, atomic_write
from regkit.errors import InputError, MissingFileError
from regkit.models import create_model

FORMAT = "regkit-checkpoint-v1"


def to_plain(obj: Any) -> Any:
    """Convert configs, tuples, paths and transformer modules into plain Python data."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if hasattr(obj, "spec") and isinstance(obj, nn.Module):
        return obj.spec()
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise InputError(f"cannot store a {type(obj).__name__} in a checkpoint as plain data: {obj!r}")


def model_spec(model: nn.Module) -> Dict[str, Any]:
    """``{"name": registry name, "kwargs": plain kwargs}`` for a model built by the registry."""
    spec = getattr(model, "regkit_spec", None)
    if spec is None:
        raise InputError(
            f"{type(model).__name__} was not built through regkit.create_model or a configs/model "
            f"file, so a checkpoint could not rebuild it"
        )
    return {"name": spec["name"], "kwargs": to_plain(spec["kwargs"])}


def save_checkpoint(path: PathLike, payload: Dict[str, Any]) -> Path:
    """Write ``payload`` (plus the format tag) to a temporary file, then rename it into place."""
    data = dict(payload)
    data["format"] = FORMAT
    data["torch_version"] = str(torch.__version__)
    return atomic_write(path, lambda tmp: torch.save(data, tmp))


def _refusal_reason(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in regkit's words. torch's own message
    advises re-running with ``weights_only=False``, which would run code from the file: that
    advice is never passed on. The object it names (both of torch 2.13's wordings: "Unsupported
    global: GLOBAL x" and "unsupported GLOBAL x whose module is blocked") is."""
    match = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(exc), flags=re.IGNORECASE)
    if match:
        return (f"it contains a '{match.group(1)}' object, which is not plain data; regkit checkpoints hold "
                f"only tensors, numbers, strings, lists and dicts, and regkit never loads code from a file")
    if isinstance(exc, (EOFError, RuntimeError)) or "operand" in str(exc) or "magic number" in str(exc):
        return "not a file written by torch.save, or a truncated or damaged one"
    return f"unreadable: {type(exc).__name__}"


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{p}: checkpoint not found")
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise InputError(f"{p}: not a regkit checkpoint ({_refusal_reason(exc)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{p}: not a regkit checkpoint (missing format tag '{FORMAT}')")
    return data


def model_from_checkpoint(data: Dict[str, Any], **overrides: Any) -> nn.Module:
    """Rebuild the model of a loaded checkpoint dict through the registry, with its weights."""
    spec = data["model"]
    model = create_model(spec["name"], **{**spec["kwargs"], **overrides})
    model.load_state_dict(data["state_dict"])
    return model


def init_weights(model: nn.Module, path: PathLike) -> Dict[str, Any]:
    """Start ``model`` from the weights of checkpoint ``path`` (fine-tuning: nothing else is taken,
    neither optimizer nor epoch). The checkpoint's model must be the same registry model with the
    same arguments; otherwise one line names both. Returns the loaded checkpoint dict."""
    data = load_checkpoint(path)
    mine, theirs = model_spec(model), data["model"]
    if mine != to_plain(theirs):
        raise InputError(f"{path}: init_from needs the same model: the checkpoint holds {theirs['name']} "
                         f"{theirs['kwargs']}, this run builds {mine['name']} {mine['kwargs']}")
    model.load_state_dict(data["state_dict"])
    return data


def load_model(path: PathLike, map_location: Any = "cpu", **overrides: Any) -> nn.Module:
    """Rebuild a model from a checkpoint file through the registry and load its weights."""
    return model_from_checkpoint(load_checkpoint(path, map_location), **overrides)
