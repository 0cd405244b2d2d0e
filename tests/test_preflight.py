"""What `lab` checks before anything starts: one line naming the file, field or knob, exit code 2,
no traceback (unless --debug), no server; and what a model family needs, decided from its config
and the training device."""

import os
import subprocess
import sys

import pytest

from core.recipe import load_recipe
from tests.conftest import REPO
from tests.zoo import FAMILIES, tiny_config
from training.preflight import PreflightError, family_settings


@pytest.fixture(scope="module")
def demo():
    return load_recipe("demo")


def test_a_softcapping_family_trains_eager_padded_on_cpu_and_flex_attention_on_cuda_one_line_each(demo):
    """The kernel is training.kernels.training_kernel's (the trainer's own choice), said here;
    only an unpacked recipe names it, the trainer loading what an unpacked recipe names."""
    gemma2 = tiny_config(FAMILIES["gemma2"])
    on_cpu, cpu_lines = family_settings(gemma2, demo, "cpu")
    on_cuda, cuda_lines = family_settings(gemma2, demo, "cuda")
    assert on_cpu == on_cuda == demo  # packed: the trainer picks the kernel itself
    assert cpu_lines[0].startswith("model.attn_implementation: sdpa -> eager on cpu: gemma2 caps attention scores")
    assert "padded" in cpu_lines[0]
    assert cuda_lines[0].startswith("model.attn_implementation: sdpa -> flex_attention on cuda: gemma2 caps")
    for lines in (cpu_lines, cuda_lines):
        assert "(attn_logit_softcapping 50), which sdpa cannot" in lines[0] and len(lines) == 2
        assert lines[1].endswith("final-logit softcapping (30) applied inside the chunked loss")
    unpacked = demo.model_copy(update={"training": demo.training.model_copy(update={"packing": False})})
    for device, kernel in [("cpu", "eager"), ("cuda", "flex_attention")]:
        named, _ = family_settings(gemma2, unpacked, device)
        assert named.model.attn_implementation == kernel
        assert named.model_dump(exclude={"model"}) == unpacked.model_dump(exclude={"model"})
    # eager, chosen explicitly, caps already: only the chunked loss's line.
    eager = demo.model_copy(update={"model": demo.model.model_copy(update={"attn_implementation": "eager"})})
    assert family_settings(gemma2, eager, "cpu") == (eager, cpu_lines[1:])


@pytest.mark.parametrize("family", [name for name in FAMILIES if name != "gemma2"])
def test_families_without_softcapping_train_as_configured(demo, family):
    for device in ("cpu", "cuda"):
        assert family_settings(tiny_config(FAMILIES[family]), demo, device) == (demo, [])


def test_flash_attention_on_cpu_has_no_way_to_train_and_is_refused_naming_the_knob(demo):
    chosen = demo.model_copy(
        update={"model": demo.model.model_copy(update={"attn_implementation": "flash_attention_2"})}
    )
    with pytest.raises(PreflightError, match=r"^model\.attn_implementation: flash_attention_2 cannot train on CPU"):
        family_settings(tiny_config(FAMILIES["llama3"]), chosen, "cpu")
    assert family_settings(tiny_config(FAMILIES["llama3"]), chosen, "cuda") == (chosen, [])


def lab(args: list[str], tmp_path, **env) -> subprocess.CompletedProcess:
    """`lab ARGS` as a user runs it: its own Prefect home, no Prefect API configured."""
    environment = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    environment |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(REPO), **env}
    command = [sys.executable, "-m", "flows.cli", *args]
    return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)


def assert_one_line(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert all(fragment in done.stderr for fragment in fragments), done.stderr


def test_plan_offline_names_the_unreadable_hub_id_and_the_knob(tmp_path):
    (tmp_path / "hf-home").mkdir()
    done = lab(
        ["plan", "lab", "--gpus", "8", "--gpu-memory", "80"],
        tmp_path,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf-home"),
    )
    assert_one_line(done, "model.name_or_path", "'ibm-granite/granite-3.0-8b-base'", "HF_HUB_OFFLINE=1")


def test_run_with_a_missing_data_file_names_it_before_any_server_starts(tmp_path):
    missing = tmp_path / "missing.jsonl"
    done = lab(["run", "demo", "--set", f'phases.0.data=["{missing}"]'], tmp_path)
    assert_one_line(done, f"phases.0.data: {missing}: no such file")
    assert not (tmp_path / "prefect-home").exists()  # no Prefect server ever opened its database
    debug = lab(["run", "demo", "--set", f'phases.0.data=["{missing}"]', "--debug"], tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "PreflightError" in debug.stderr


def test_bad_yaml_and_a_missing_extra_are_one_line_each(tmp_path, capsys):
    from flows.cli import main

    recipe = tmp_path / "broken.yaml"
    recipe.write_text("name: broken\nmodel: {name_or_path: x\n")
    gpu_flash = ["--set", "model.attn_implementation=flash_attention_2", "--set", "launch.backend=ddp"]
    gpu_flash += ["--set", "launch.scheduler=slurm"]  # its nodes have the GPUs
    for args, expected in [
        (["run", str(recipe)], f"{recipe}:3:1: not valid YAML"),
        (["plan", str(recipe)], f"{recipe}:3:1: not valid YAML"),
        (
            ["run", "demo", *gpu_flash],
            "flash_attention_2 needs flash-attn, not installed: pip install 'recipe-lab[gpu]'",
        ),
        (
            ["run", "demo", "--set", "model.attn_implementation=flash_attention_2"],
            "flash_attention_2 cannot train on CPU",
        ),
    ]:
        with pytest.raises(SystemExit) as done:
            main(args)
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.count("\n") == 1 and expected in err, err


def test_every_entry_point_turns_what_a_user_can_fix_into_one_line(tmp_path, capsys):
    """Each command's typical mistake: exit code 2 and one line on stderr naming it, before any
    server or process starts (none of these start one)."""
    import socket

    from flows.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        nowhere = str(tmp_path / "nowhere")
        for args, expected in [
            (["plan", "demo", "--set", "training.learning_rate=-1"], "training.learning_rate"),
            (["run", "demo", "--set", f'phases.0.data=["{nowhere}"]'], f"phases.0.data: {nowhere}: no such file"),
            (["eval", nowhere], f"target {nowhere}: cannot read the config of '{nowhere}'"),
            (["sweep", "demo", "--grid", "training.no_such_knob=1,2"], "training.no_such_knob"),
            (["reproduce", "--seeds", "0"], "--seeds 0: at least 1"),
            (["nightly-spread", "no-such-recipe"], "recipe 'no-such-recipe': no such file"),
            (["demo", "--recipe", "no-such-recipe"], "recipe 'no-such-recipe': no such file"),
            (["export", nowhere, "--to", str(tmp_path / "out")], f"{nowhere}: no manifest.json there"),
            (["serve", "--port", port], f"--port {port}: cannot serve there"),
        ]:
            with pytest.raises(SystemExit) as done:
                main(args)
            err = capsys.readouterr().err
            assert done.value.code == 2 and expected in err and "Traceback" not in err, (args, err)
            assert err.count("\n") == 1 or err.startswith("<recipe>") or ": invalid recipe" in err, (args, err)
