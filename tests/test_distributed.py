"""DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU processes (gloo) under the real launcher.

Each run is compared with a plain one-process run on the same data: the same samples per step
and the token-mean loss over both ranks give the same loss and gradient norm up to float
order, so the DeepSpeed path keeps the step's maths exact. The final checkpoint (gathered from
the ZeRO-3 shards) must reload with `from_pretrained` and reproduce the log-probs that the
in-training model computed on the probe at save time. Each run also pauses after step 3 and
is relaunched, so resuming from the state saved through DeepSpeed's engine is part of it.
"""

import json
from pathlib import Path

import pytest
import torch

from core.recipe import RecipeError, load_recipe
from training.checkpoint import token_logprobs
from training.job import TrainJob
from training.launch.config import accelerate_config, deepspeed_config, launch_command
from training.launch.local import run_training
from training.precision import autocast_mode, weights_dtype
from training.setup import fsdp_plugin

# fp32 everywhere; the sharded runs sum the same terms in another order (and over gloo).
LOSS_REL = 1e-4
LOGPROB_ABS = 1e-4


@pytest.fixture(scope="module")
def small_data(prepared_slice) -> str:
    return prepared_slice("phase00", 96)


def job_for(out: Path, assets, data_dir: str, **overrides) -> TrainJob:
    recipe = load_recipe(
        "demo",
        {
            "training.epochs": 1,
            "training.effective_batch_size": 16,
            "training.warmup_steps": 0,
            "training.max_tokens_per_micro_batch": 64,  # several micro-batches per rank and step
            "checkpointing.save_every_samples": None,
            "checkpointing.state_every_steps": None,
            **overrides,
        },
    )
    model = str(assets.base_model_dir)
    return TrainJob(
        run_id="d",
        phase="p",
        recipe=recipe,
        model_path=model,
        parent_checkpoint=model,
        data_dir=data_dir,
        output_dir=str(out),
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("launch", "message"),
    [
        ({"backend": "ddp", "offload_optimizer": True}, "need backend: deepspeed"),
        ({"backend": "deepspeed", "zero_stage": 2, "offload_params": True}, "needs zero_stage: 3"),
        ({"num_machines": 2}, "needs main_process_ip"),
        ({"num_machines": 2, "main_process_ip": "10.0.0.1", "machine_rank": 2}, "must be < num_machines"),
    ],
)
def test_inconsistent_launch_settings_are_recipe_errors(launch, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("demo", {f"launch.{k}": v for k, v in launch.items()})


def test_zero3_offload_config_and_a_multi_node_command():
    recipe = load_recipe(
        "lab",
        {
            "launch.backend": "deepspeed",
            "launch.zero_stage": 3,
            "launch.offload_optimizer": True,
            "launch.offload_params": True,
            "launch.num_machines": 2,
            "launch.machine_rank": 1,
            "launch.main_process_ip": "10.0.0.1",
        },
    )
    ds = deepspeed_config(recipe)
    assert (
        ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    )
    assert (
        ds["zero_optimization"]["offload_optimizer"]["device"]
        == ds["zero_optimization"]["offload_param"]["device"]
        == "cpu"
    )
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 1.0
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_batch_size"] == 16  # nominal: 8 GPUs x 2 machines
    acc = accelerate_config(recipe.launch, Path("ds.json"), autocast_mode(recipe))
    assert acc["distributed_type"] == "DEEPSPEED" and acc["deepspeed_config"]["zero3_init_flag"]
    assert "mixed_precision" not in acc and not acc["use_cpu"]  # both would override or drop DeepSpeed's settings
    cmd = " ".join(launch_command(Path("a.yaml"), Path("job.json"), recipe.launch))
    assert (
        "--num_processes 16 --num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 29500"
        in cmd
    )
    assert "--multi_gpu" not in cmd and "--cpu" not in cmd


def test_fsdp_config_keeps_fp32_weights_and_computes_in_the_model_dtype():
    recipe = load_recipe("lab", {"launch.backend": "fsdp"})
    acc = accelerate_config(recipe.launch, None, autocast_mode(recipe))
    assert acc["distributed_type"] == "FSDP" and acc["fsdp_config"]["fsdp_version"] == 2
    assert acc["mixed_precision"] == "bf16" and weights_dtype(recipe) == "float32"
    assert acc["fsdp_config"]["fsdp_cpu_ram_efficient_loading"]  # no full copy of the weights per rank
    policy = fsdp_plugin(recipe).mixed_precision_policy  # what the training script hands accelerate
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, assets, small_data) -> list[dict]:
    job = job_for(tmp_path_factory.mktemp("ref"), assets, small_data)
    run_training(job, on_line=lambda _: None)
    return read_jsonl(Path(job.output_dir) / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_two_cpu_ranks_trains_exactly_and_saves_a_loadable_checkpoint(
    tmp_path, assets, small_data, reference, stage
):
    from transformers import AutoModelForCausalLM

    job = job_for(
        tmp_path,
        assets,
        small_data,
        **{"launch.backend": "deepspeed", "launch.num_processes": 2, "launch.zero_stage": stage},
    )
    out = Path(job.output_dir)
    # Pause after step 3 (rolling state saved through DeepSpeed's engine), then relaunch.
    run_training(job.model_copy(update={"stop_after_samples": 48}), on_line=lambda _: None)
    assert len(read_jsonl(out / "metrics.jsonl")) == 3 and (out / "state").is_dir()
    lines: list[str] = []
    checkpoints = run_training(job, on_line=lines.append)
    assert "resuming after step 3 from " + str(out / "state") in lines

    # endswith: the ranks share one pipe, so another rank's half-written warning may precede the line.
    assert all(any(line.endswith(f"world_size=2 rank={r}") for line in lines) for r in (0, 1))
    assert json.loads((out / "deepspeed.json").read_text())["zero_optimization"]["stage"] == stage
    ranks = [read_jsonl(out / "samples" / f"rank{r}.jsonl") for r in (0, 1)]
    for step0, step1 in zip(*ranks, strict=True):
        assert step0["ids"] and step1["ids"] and not set(step0["ids"]) & set(step1["ids"])
    assert sum(len(s["ids"]) for r in ranks for s in r) == 96

    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6] and all(m["micro_batches"] >= 4 for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in reference], rel=LOSS_REL)
    assert [m["grad_norm"] for m in metrics] == pytest.approx([m["grad_norm"] for m in reference], rel=LOSS_REL)

    final = checkpoints[-1]
    probe = json.loads((final / "meta.json").read_text())["probe"]
    reloaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(assets.base_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([probe["input_ids"]])
    assert token_logprobs(reloaded, ids) == pytest.approx(probe["token_logprobs"], abs=LOGPROB_ABS)
    moved = max(abs(a - b) for a, b in zip(token_logprobs(base, ids), probe["token_logprobs"], strict=False))
    assert moved > 100 * LOGPROB_ABS, "the probe must tell a trained model from the base model"
