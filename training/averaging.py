"""Uniform weight averaging of a phase's checkpoints: one more candidate for selection.

The average of the last k checkpoints of one run (a "model soup" along the trajectory) often
scores like or above the best single one at no training cost. It is saved like a checkpoint
(safetensors + tokenizer, meta.json last) so it is evaluated, selected and loaded like any.
"""

from __future__ import annotations

from pathlib import Path

from core import records
from core.records import AveragedMeta, CheckpointMeta


def average_checkpoints(sources: list[Path], out: Path) -> Path:
    """Save the uniform mean of the `sources`' parameters into `out`; return `out`.

    Summed in float32 and saved in the first source's dtype. Parameters are read through the
    model (tied weights counted once); buffers are the first source's (they are not trained).
    """
    import torch  # here: the phase task imports this module, and only averaging touches a model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if len(sources) < 2:
        raise ValueError(f"averaging needs at least 2 checkpoints, got {[str(s) for s in sources]}")
    saved_dtype = AutoConfig.from_pretrained(sources[0]).dtype or torch.float32
    model = AutoModelForCausalLM.from_pretrained(sources[0], dtype=torch.float32)
    total = dict(model.named_parameters())
    with torch.no_grad():
        for source in sources[1:]:
            other = dict(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).named_parameters())
            if other.keys() != total.keys():
                raise ValueError(f"{source}: parameters differ from {sources[0]}'s; cannot average")
            for name, param in total.items():
                param.add_(other[name])
        for param in total.values():
            param.div_(len(sources))
    out.mkdir(parents=True, exist_ok=True)
    (out / records.META).unlink(missing_ok=True)  # complete only once meta.json is written again, last
    model.to(saved_dtype).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(sources[-1]).save_pretrained(out)
    last = records.read(CheckpointMeta, sources[-1] / records.META)
    meta = AveragedMeta(
        phase=last.phase,
        samples_seen=last.samples_seen,  # what it cost: the training of the newest one
        averaged=[str(s) for s in sources],
        parent_checkpoint=last.parent_checkpoint,
    )
    (out / records.META).write_text(records.dumps(meta, indent=2) + "\n")
    return out
