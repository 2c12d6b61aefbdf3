"""Where a model runs and in what dtype: `--device` and `--dtype` resolved against this machine."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch: "Expected one of cpu, cuda, ... device type at start of device string"
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: not a device here; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


def resolve_dtype(name: str, stored: torch.dtype, device: torch.device) -> torch.dtype:
    """`auto`: fp32 on CPU; on a GPU the stored dtype, except fp32 checkpoints run in bf16."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if stored == torch.float32 else stored


def cuda_device(device: torch.device) -> torch.device | None:
    """`device` with its index if it is a CUDA device (the grouped kernels' only kind), else None."""
    if device.type != "cuda":
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
