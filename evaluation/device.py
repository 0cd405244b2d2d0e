"""Where a checkpoint is evaluated: on the accelerator in the training dtype when there is one.

Checkpoints are saved in the recipe's model dtype (config.json says which), so `dtype="auto"`
loads a bf16 checkpoint as bf16 on the GPU, straight into GPU memory. On CPU the weights are
loaded as float32: CPUs emulate bfloat16 matmuls slowly.
"""

from __future__ import annotations

from typing import Any


def eval_device(choice: str) -> str:
    """`evaluation.device` resolved: auto = cuda when available, else cpu."""
    import torch  # here, not at the top: the flow process imports this module only to orchestrate

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("evaluation.device is 'cuda' but no CUDA device is available here")
    return choice


def load_causal_lm(model_dir: str, device_choice: str) -> Any:
    """The checkpoint's causal LM, in eval mode, on the chosen device."""
    import torch
    from transformers import AutoModelForCausalLM

    device = eval_device(device_choice)
    dtype = "auto" if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device).eval()
