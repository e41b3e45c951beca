"""Mixed precision: `--amp auto|off|bf16|fp16` resolved to what this device runs natively.

Autocast runs the forward pass in bf16/fp16 while weights, optimizer state, evaluation and
export stay fp32; config.json's "engine" block records what `auto` became.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from toolkit.errors import ToolkitError

AMP_MODES = ("auto", "off", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """How forward passes run: under autocast to `dtype`, or in fp32 when dtype is None."""

    name: str  # "off", "bf16" or "fp16": what config.json records
    dtype: torch.dtype | None = None

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """fp16's narrow exponent underflows small gradients, so it needs loss scaling;
        bf16 has fp32's range and needs none: its scaler is disabled and passes through."""
        return torch.amp.GradScaler(device.type, enabled=self.name == "fp16")


FP32 = Precision("off")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), which oneDNN uses for
    convolutions and matmuls. Without them bf16 is emulated and slower than fp32."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def resolve_amp(mode: str, device: torch.device, bf16_supported: bool | None = None) -> Precision:
    """`--amp` -> Precision. auto: bf16 where the hardware runs it natively (CUDA GPUs from
    Ampere on, CPUs with AVX512-BF16/AMX); otherwise fp16 with loss scaling on a GPU and fp32
    on a CPU. Autocast keeps the weights and the optimizer in fp32 either way.

    `bf16_supported` defaults to asking the device; tests pass it to check the logic anywhere.
    """
    if mode not in AMP_MODES:
        raise ToolkitError(f"unknown --amp '{mode}'; choose one of: {', '.join(AMP_MODES)}")
    if mode == "off":
        return FP32
    if mode == "fp16" and device.type != "cuda":
        raise ToolkitError("--amp fp16 needs a CUDA GPU; on the CPU use --amp bf16 or --amp off")
    if mode == "auto":
        if bf16_supported is None:
            bf16_supported = (
                torch.cuda.is_bf16_supported(including_emulation=False)
                if device.type == "cuda"
                else cpu_has_native_bf16()
            )
        if bf16_supported:
            mode = "bf16"
        elif device.type == "cuda":
            mode = "fp16"  # pre-Ampere GPUs, with loss scaling
        else:
            return FP32  # emulated bf16 would be slower than fp32
    return Precision(mode, torch.bfloat16 if mode == "bf16" else torch.float16)
