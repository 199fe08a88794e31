"""What train.py, teacher_cache.py and lens.py decide the same way about the machine they run on."""
import importlib.util

import torch


def attention_implementation(device, dtype):
    """(transformers' attn_implementation, why): flash-attn's varlen kernel where it can run, else sdpa.

    flash-attn runs only where all three hold: its kernels import (a wheel built against another torch is
    found by the package manager but fails at import with an undefined symbol), the device is CUDA, and the
    compute dtype is bf16 or fp16 (it refuses fp32 q/k/v, which transformers leaves in the weights' dtype)."""
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash-attn is not installed"
    if torch.device(device).type != "cuda":
        return "sdpa", "flash-attn needs a CUDA device"
    if dtype not in (torch.bfloat16, torch.float16):
        return "sdpa", "flash-attn needs bf16/fp16"
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401  the compiled kernels, not only the package
    except Exception as e:  # ImportError, OSError from a shared library: anything means it cannot run
        return "sdpa", f"flash-attn does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return "flash_attention_2", "flash-attn's varlen kernel"
