"""Where torch runs: a device name from a config or the command line (auto, cpu, cuda, cuda:N) resolved."""

from __future__ import annotations

import torch

from d2mtl.errors import UserError


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available; use device: auto or cpu")
    return torch.device(device)


def use_threads(threads: int | None) -> None:
    """torch's CPU threads in this process (config.fields.Threads); None keeps torch's default."""
    if threads is not None:
        torch.set_num_threads(threads)
