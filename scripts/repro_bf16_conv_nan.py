#!/usr/bin/env python
"""Reproduce a PyTorch CPU bfloat16 bug that regkit users can meet with trainer.precision=bf16.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)``, the weight gradient of a 3x3x3
``Conv3d`` with padding 1 on an input of 2 voxels per axis is sometimes NaN: the kernel reads
memory it did not initialise, so it fails only when the allocator hands back a block that held
NaN. regkit code is not involved (a bare ``nn.Conv3d``). VoxelMorph's bottleneck is 1/16 of the
input, so 32^3 volumes hit it; 48^3 and larger (a 3^3 bottleneck) do not. The trainer stops with
``non-finite loss ... lower the learning rate or check the inputs`` when it happens.

    .venv/bin/python scripts/repro_bf16_conv_nan.py     # prints NaN counts per input size
"""
import random

import torch


def dirty_heap() -> None:
    """Leave NaN-filled blocks on the heap for the next allocations to reuse."""
    blocks = [torch.full((random.randint(1000, 3_000_000),), float("nan")) for _ in range(60)]
    del blocks


def main(trials: int = 40) -> None:
    torch.manual_seed(0)
    random.seed(0)
    print(f"torch {torch.__version__}; {trials} trials per size")
    for size in (1, 2, 3, 5):
        bad = 0
        for _ in range(trials):
            dirty_heap()
            conv = torch.nn.Conv3d(32, 32, 3, padding=1)
            x = torch.randn(2, 32, size, size, size, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = conv(x)
            y.float().sum().backward()
            bad += int(not torch.isfinite(conv.weight.grad).all())
        print(f"input {size}^3: non-finite weight gradient in {bad}/{trials} trials")


if __name__ == "__main__":
    main()
