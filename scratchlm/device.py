"""Device and precision, chosen once and said out loud."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from scratchlm.errors import UserError


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None
    """bf16 autocast on GPUs that support it; None means plain fp32."""

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def precision_name(self) -> str:
        return "fp32" if self.autocast_dtype is None else "bf16 autocast"

    def describe(self) -> str:
        if self.device.type == "cpu":
            where = f"cpu ({torch.get_num_threads()} threads)"
        elif self.device.type == "cuda":
            where = f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        else:
            where = str(self.device)
        return f"device: {where}, precision: {self.precision_name}"


def pick_device(name: str, setting: str = "pretrain.device") -> torch.device:
    """The device that `name` (auto, cpu, cuda, cuda:N or mps) names, checked to be there;
    `setting` is how an error names the option."""
    if name == "auto":
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{setting} = {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{setting} = {name!r} but no CUDA GPU is visible")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(
            f"{setting} = {name!r} but only {torch.cuda.device_count()} GPUs are visible"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{setting} = {name!r} but MPS is not available")
    return device


def pick_runtime(device_name: str, precision: str) -> Runtime:
    """bf16 autocast where the GPU supports it (fp32 master weights); fp32 on CPU, where bf16 is
    29x slower on AVX2-only machines."""
    device = pick_device(device_name)
    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16_ok else "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, torch.bfloat16 if precision == "bf16" else None)
