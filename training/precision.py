"""Precision of a training run, in one place: what the weights are kept in, what runs under autocast.

Mixed precision (the default for bfloat16 / float16 recipes) computes in `model.dtype` but keeps
float32 master weights, float32 AdamW state and float32 gradient accumulation, on every backend:

- cpu / ddp: the model is loaded in float32 and accelerate autocasts the forward
  (`mixed_precision: bf16|fp16`; fp16 adds its gradient scaler). Gradients land in float32.
- fsdp: float32 sharded weights, compute in `model.dtype`, gradients reduced (and, between
  syncs, accumulated) in float32 (FSDP2 MixedPrecisionPolicy reduce_dtype).
- deepspeed: the engine holds the module in `model.dtype` and its ZeRO optimizer the float32
  masters and AdamW state; `data_types.grad_accum_dtype: fp32` accumulates gradients in float32.

`training.mixed_precision: false` keeps everything in `model.dtype` (pure bfloat16): at SFT
learning rates most AdamW updates are smaller than half a bfloat16 ulp of the weight and vanish.
Checkpoints are always saved in `model.dtype`.
"""

from __future__ import annotations

from typing import Literal

from core.recipe import Recipe


def is_mixed(recipe: Recipe) -> bool:
    """Low-precision compute over float32 masters."""
    return recipe.model.dtype != "float32" and recipe.training.mixed_precision


def weights_dtype(recipe: Recipe) -> str:
    """The dtype the model is loaded (and its weights updated) in.

    DeepSpeed loads in the compute dtype: its engine casts the module anyway and its optimizer
    keeps the float32 masters.
    """
    if is_mixed(recipe) and recipe.launch.backend != "deepspeed":
        return "float32"
    return recipe.model.dtype


def autocast_mode(recipe: Recipe) -> Literal["no", "bf16", "fp16"]:
    """accelerate's `mixed_precision` for cpu / ddp / fsdp (DeepSpeed takes precision from its JSON)."""
    if not is_mixed(recipe):
        return "no"
    return "bf16" if recipe.model.dtype == "bfloat16" else "fp16"
