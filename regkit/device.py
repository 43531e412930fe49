"""Devices, precision and memory layout: the low-level helpers that the trainer, the predictor,
the registration engine and :mod:`regkit.distributed` share. Imports nothing of regkit but its
errors, so every layer may use it.

Under ``torchrun`` each process is told its place by environment variables (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``); the readers of those live here too, since the device a process
uses follows from them (``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Mapping, Optional

import torch

from regkit.errors import InputError, check_choice

log = logging.getLogger("regkit")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- where am I (torchrun's environment contract) -------------------------------------------------
def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_by_torchrun() -> bool:
    """True for a process that torchrun (or another launcher with its env contract) started
    as one of several: ``WORLD_SIZE > 1`` and ``LOCAL_RANK`` set."""
    return "LOCAL_RANK" in os.environ and env_world_size() > 1


# -- devices ------------------------------------------------------------------------------------
def resolve_device(device: Any = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU. Under torchrun a CUDA device is ``cuda:LOCAL_RANK``.

    A ``torch.device`` passes through (checked the same way). Raises :class:`InputError` for
    unknown names, for CUDA without CUDA, and for an explicit index under torchrun.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"Unknown device '{device}'. Use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but CUDA is not available (torch {torch.__version__})")
    if dev.type == "cuda" and launched_by_torchrun():
        if dev.index is not None:
            raise InputError(f"device '{device}': under torchrun each process uses cuda:LOCAL_RANK; set "
                             f"trainer.device=cuda and choose the GPUs with CUDA_VISIBLE_DEVICES")
        local = env_local_rank()
        if local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                             f"lower --nproc_per_node")
        dev = torch.device("cuda", local)
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU. Timings are only taken at
    such points, since CUDA calls return before their kernels finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def move_to(batch: Mapping[str, Any], device: torch.device) -> Dict[str, Any]:
    """Every tensor of a batch dict on ``device`` (other values unchanged)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# -- precision and layout -----------------------------------------------------------------------
def check_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``trainer.precision`` (``None`` for fp32), or a clear error."""
    check_choice("trainer.precision", precision, PRECISIONS)
    dtype = PRECISIONS[precision]
    if dtype is None:
        return None
    if not torch.amp.is_autocast_available(device.type):
        raise InputError(f"trainer.precision={precision}: torch {torch.__version__} has no autocast on {device.type}")
    if dtype == torch.float16 and device.type == "cpu":
        log.warning("trainer.precision=fp16 on the CPU is correct but slow (no fast float16 CPU convolutions; "
                    "see docs/scaling.md); bf16 is the CPU's reduced precision")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise InputError(f"trainer.precision=bf16: {torch.cuda.get_device_name(device)} has no native bfloat16 "
                         f"(Ampere or newer); use fp16")
    return dtype


def memory_format(ndim: int) -> torch.memory_format:
    """channels-last layout for 2-D (NHWC) or 3-D (NDHWC) images."""
    return torch.channels_last_3d if ndim == 3 else torch.channels_last
