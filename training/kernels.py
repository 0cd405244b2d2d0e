"""Which attention kernel trains packed rows, per device (no torch here: `lab plan` asks it too).

training.attention holds the CPU kernel itself (sdpa per sample); the trainer loads the kernel
chosen here.
"""

from __future__ import annotations

from typing import Any

SDPA_PER_SAMPLE = "sdpa_per_sample"  # training.attention's kernel

# Kernel choice (training only). The recipe's `model.attn_implementation` says what the user
# asked for; what trains packed rows depends on the device:
#
#   asked               CUDA                                         CPU
#   sdpa (default)      flash_attention_2 if flash-attn imports,     sdpa_per_sample
#                       else flex_attention
#   flash_attention_2   flash_attention_2                            (fails at load: flash-attn is CUDA-only)
#   flex_attention      flex_attention                               sdpa_per_sample (flex has no CPU backward)
#   eager               eager, padded                                eager, padded
#
# flex_attention runs transformers' own packed BlockMask (masking_utils builds it from the
# position_ids: samples apart, sliding windows kept) and transformers compiles the kernel; the
# BlockMask skips the blocks between samples, so a packed row costs about its samples' squared
# lengths like a varlen kernel, not the row's. Its rows are padded to FLEX_BLOCK tokens so that
# the compiled kernel sees few distinct shapes.
# Hook for model families: `config` is the model's config, so a family whose attention needs
# more than these kernels give says so here. Attention softcapping (Gemma 2) has a score_mod in
# transformers' flex_attention on CUDA and only eager on CPU (sdpa and sdpa_per_sample ignore it).
FLEX_BLOCK = 128  # flex_attention's block size: packed rows are padded to a multiple of it
VARLEN_KERNELS = ("flash_attention_2", "flex_attention", SDPA_PER_SAMPLE)  # keep packed samples apart in one row


def flash_attn_imports() -> bool:
    """flash-attn 2 is installed for this CUDA build and imports (a wheel built for another torch
    is installed but fails to import)."""
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def training_kernel(
    requested: str, device_type: str, config: dict[str, Any] | Any, flash_available: bool | None = None
) -> str:
    """The attn_implementation that trains packed rows of a model with `config` on `device_type`
    ("cuda" or "cpu") when the recipe asks for `requested` (table above). `flash_available`
    None: whether flash-attn imports here."""
    if requested == "eager":
        return "eager"
    settings = config if isinstance(config, dict) else vars(config)  # config.json's dict or a PretrainedConfig
    if settings.get("attn_logit_softcapping"):
        return "flex_attention" if device_type == "cuda" else "eager"
    if requested == "flash_attention_2":
        return requested
    if device_type != "cuda":
        return SDPA_PER_SAMPLE
    if requested == "flex_attention":
        return requested
    if flash_available is None:
        flash_available = flash_attn_imports()
    return "flash_attention_2" if flash_available else "flex_attention"


def row_multiple(kernel: str) -> int | None:
    """Packed rows of `kernel` are padded to a multiple of this many tokens (None: not padded)."""
    return FLEX_BLOCK if kernel == "flex_attention" else None
