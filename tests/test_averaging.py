"""Checkpoint averaging: the saved average is the element-wise mean of the sources' weights."""

import pytest
import torch
from safetensors.torch import load_file

from core import records
from core.records import AveragedMeta, CheckpointMeta, Probe, StepMetrics
from training.averaging import average_checkpoints


def checkpoint_meta(samples: int) -> CheckpointMeta:
    """A trained checkpoint's meta.json; only phase, samples and parent matter to averaging."""
    numbers = {name: 0 for name in StepMetrics.model_fields} | {"mfu": None, "samples_seen": samples}
    return CheckpointMeta(
        phase="p",
        run_id="r",
        samples_seen=samples,
        step=1,
        parent_checkpoint="x",
        code_version="test",
        metrics=StepMetrics.model_validate(numbers),
        probe=Probe(input_ids=[], token_logprobs=[]),
        recipe={},
    )


def test_average_of_checkpoints_is_the_elementwise_mean(tmp_path, assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.base_model_dir)
    sources = []
    for i, shift in enumerate([0.0, 1.0, 5.0]):
        model = AutoModelForCausalLM.from_pretrained(assets.base_model_dir, dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(shift)
        path = tmp_path / f"samples_{(i + 1) * 100}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        (path / "meta.json").write_text(records.dumps(checkpoint_meta(samples=(i + 1) * 100)))
        sources.append(path)

    out = average_checkpoints(sources, tmp_path / "averaged" / "avg_last3")
    weights = [load_file(s / "model.safetensors") for s in sources]
    averaged = load_file(out / "model.safetensors")
    assert averaged.keys() == weights[0].keys()
    for name, value in averaged.items():
        assert torch.allclose(value, (weights[0][name] + weights[1][name] + weights[2][name]) / 3, atol=1e-6), name
    meta = records.read(AveragedMeta, out / "meta.json")
    assert meta.samples_seen == 300 and meta.averaged == [str(s) for s in sources] and meta.parent_checkpoint == "x"
    assert AutoModelForCausalLM.from_pretrained(out) is not None  # loads like any checkpoint

    with pytest.raises(ValueError, match="at least 2 checkpoints"):
        average_checkpoints(sources[:1], tmp_path / "one")
