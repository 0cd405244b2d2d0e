"""Mixed precision that learns: bf16 compute over fp32 masters moves the weights like fp32 does.

At SFT learning rates an AdamW update is smaller than half a bf16 ulp of most weights, so a
model whose weights live in bf16 loses most updates to rounding. Through the real training
script, 10 AdamW steps at lr 1e-5 change (seen in bf16) about as many weights with the bf16
recipe as in fp32, and far more than the pure-bf16 negative control.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.recipe import RecipeError, load_recipe
from training.job import TrainJob
from training.launch.local import run_training


def test_float16_without_loss_scaling_is_refused_naming_the_field():
    with pytest.raises(RecipeError, match="training.mixed_precision"):
        load_recipe("demo", {"model.dtype": "float16", "training.mixed_precision": False})
    load_recipe("demo", {"model.dtype": "float16"})  # mixed precision: fp32 masters and loss scaling


def changed_fraction(checkpoint: Path, base: dict[str, torch.Tensor]) -> float:
    """Fraction of weight elements whose bf16 value differs from the base model's bf16 value."""
    trained = load_file(checkpoint / "model.safetensors")
    changed = sum((trained[k].bfloat16() != base[k].bfloat16()).sum().item() for k in base)
    return changed / sum(t.numel() for t in base.values())


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend",
    [
        "cpu",
        pytest.param(
            "ddp",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ],
)
def test_bf16_recipe_moves_as_many_weights_as_fp32_and_pure_bf16_far_fewer(tmp_path, assets, prepared_slice, backend):
    data_dir = prepared_slice("phase00", 80)
    base = load_file(Path(assets.base_model_dir) / "model.safetensors")
    runs = {
        "bf16_recipe": {"model.dtype": "bfloat16"},
        "fp32": {"model.dtype": "float32"},
        "pure_bf16": {"model.dtype": "bfloat16", "training.mixed_precision": False},
    }
    fractions = {}
    for name, overrides in runs.items():
        recipe = load_recipe(
            "demo",
            {
                "training.effective_batch_size": 8,  # 80 samples: 10 AdamW steps
                "training.epochs": 1,
                "training.learning_rate": 1e-5,
                "training.warmup_steps": 0,
                "checkpointing.save_every_samples": None,
                "checkpointing.state_every_steps": None,
                "launch.backend": backend,  # ddp with one process: the GPU (bf16 autocast on CUDA)
                **overrides,
            },
        )
        job = TrainJob(
            run_id=name,
            phase="p",
            recipe=recipe,
            model_path=str(assets.base_model_dir),
            parent_checkpoint="base",
            data_dir=data_dir,
            output_dir=str(tmp_path / name),
        )
        (checkpoint,) = run_training(job, on_line=lambda _: None)
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 10
        # Saved in the model's dtype, and said so in config.json (dtype="auto" loads it so).
        saved = {t.dtype for t in load_file(checkpoint / "model.safetensors").values()}
        assert saved == {getattr(torch, recipe.model.dtype)}
        assert json.loads((checkpoint / "config.json").read_text())["dtype"] == recipe.model.dtype
        fractions[name] = changed_fraction(checkpoint, base)
    print(f"fraction of weights changed (seen in bf16): {fractions}")
    assert fractions["fp32"] > 0.2  # the comparison means something only if fp32 moves many weights
    assert abs(fractions["bf16_recipe"] - fractions["fp32"]) <= 0.1 * fractions["fp32"]
    assert fractions["pure_bf16"] < 0.5 * fractions["fp32"]
