"""The finetune flow end to end on the tiny model, under a temporary Prefect API."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from core import records
from core.recipe import SelectionConfig

pytestmark = pytest.mark.slow


def flow_logs(flow_run_id) -> str:
    """Everything the flow run logged, as stored by the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, prefect_server, assets):
    """One phased smoke run of the demo recipe, shared by the tests that read its files."""
    from flows.finetune import finetune

    root = tmp_path_factory.mktemp("runs")
    overrides = {"export.to": str(root / "export-e2e")}  # the flow's own export at the end
    result = finetune(recipe="demo", overrides=overrides, storage_root=str(root), smoke=True, run_id="e2e")
    return result, root / "e2e"


def test_phased_smoke_run_writes_every_file_of_the_data_contract(smoke_run):
    result, run = smoke_run
    assert result.run_uri == str(run)

    manifest = records.read_manifest(str(run))
    assert list(manifest.phases) == ["phase00", "phase05", "phase10"]
    assert manifest.recipe["training"]["effective_batch_size"] == 32

    previous_winner = None
    for phase in ("phase00", "phase05", "phase10"):
        stats = json.loads((run / "data" / phase / "stats.json").read_text())
        assert stats["samples"] > 0
        assert (run / "data" / phase / "tokens.parquet").exists()
        metrics = [json.loads(x) for x in (run / phase / "metrics.jsonl").read_text().splitlines()]
        assert metrics and all(m["step"] == i + 1 for i, m in enumerate(metrics))
        checkpoints = sorted((run / phase / "checkpoints").iterdir())
        assert checkpoints and all((c / "meta.json").exists() for c in checkpoints)
        for c in checkpoints:
            meta = json.loads((c / "meta.json").read_text())
            assert meta["phase"] == phase
            if previous_winner:
                assert meta["parent_checkpoint"] == previous_winner  # the gate's winner started this phase
            evaluation = json.loads((run / phase / "eval" / c.name / "lm_eval.json").read_text())
            assert set(evaluation["metrics"]) >= {
                "lab_instruction/rule_acc",
                "lab_knowledge/acc",
                "lab_skills/exact_match",
            }
        selection = json.loads((run / phase / "selection.json").read_text())
        assert selection["gate"]["passed"] is True
        assert selection["winner"]["checkpoint"] in {str(c) for c in checkpoints} | {selection["start"]["checkpoint"]}
        # Paired fields: every other candidate's paired difference to the winner (an interval around
        # its objective gap) and why it lost; validation/loss of the start and every checkpoint.
        assert selection["policy"] == SelectionConfig().policy == manifest.phases[phase].policy
        for c in [selection["start"], *selection["candidates"]]:
            if c["checkpoint"] == selection["winner"]["checkpoint"]:
                assert c["vs_winner"] is None and c["lost"] is None
                continue
            versus = c["vs_winner"]
            assert versus["low"] <= versus["value"] <= versus["high"] and c["lost"]
            assert versus["value"] == pytest.approx(c["objective"] - selection["winner"]["objective"], abs=1e-9)
            assert versus["metrics"][0]["n"] == 40 and versus["metrics"][0]["dropped"] == 0  # smoke: limit 40
            assert c["metrics"]["validation/loss"] > 0
        # The held-out slice is in the manifest and was never trained on.
        held_out = set(manifest.phases[phase].validation_ids)
        trained = {
            i
            for line in (run / phase / "samples" / "rank0.jsonl").read_text().splitlines()
            for i in json.loads(line)["ids"]
        }
        assert held_out and not held_out & trained
        previous_winner = selection["winner"]["checkpoint"]

    summary = pd.read_csv(run / "report" / "summary.csv")
    assert list(summary["phase"]) == ["base", "phase00", "phase05", "phase10"]
    for png in ("training.png", "scores.png"):
        assert (run / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_tidy_results_table_has_a_row_per_checkpoint_and_metric(smoke_run):
    from evaluation.report import TIDY_COLUMNS

    _, run = smoke_run
    tidy = pd.read_parquet(run / "report" / "results.parquet")
    assert list(tidy.columns) == TIDY_COLUMNS
    evaluated = {(p, c.name) for p in ("phase00", "phase05", "phase10") for c in (run / p / "eval").iterdir()}
    assert set(zip(tidy["phase"], tidy["checkpoint"], strict=False)) == evaluated
    knowledge = tidy[(tidy.task == "lab_knowledge") & (tidy.metric == "acc")]
    assert len(knowledge) == len(evaluated) and knowledge["stderr"].notna().all()


def test_rerun_with_the_same_run_id_skips_done_phases(smoke_run):
    from flows.finetune import finetune

    result, run = smoke_run
    mtime = (run / "phase00" / "metrics.jsonl").stat().st_mtime
    again = finetune(recipe="demo", storage_root=str(run.parent), smoke=True, run_id="e2e")
    assert [p.selected for p in again.phases] == [p.selected for p in result.phases]
    assert (run / "phase00" / "metrics.jsonl").stat().st_mtime == mtime


def test_lab_eval_on_a_run_evaluates_only_what_has_no_results(smoke_run):
    from flows.evaluate import evaluate

    _, run = smoke_run
    victim = sorted((run / "phase05" / "eval").iterdir())[-1]
    (victim / "lm_eval.json").unlink()
    phases = ("phase00", "phase05", "phase10")
    timelines = {p: (run / p / "evaluations.jsonl").read_text().splitlines() for p in phases}
    rows = evaluate(targets=[str(run)])
    assert (victim / "lm_eval.json").exists()
    added = {p: (run / p / "evaluations.jsonl").read_text().splitlines()[len(timelines[p]) :] for p in phases}
    assert [json.loads(line)["model"] for p in phases for line in added[p]] == [victim.name]  # one model, one worker
    checkpoints = [c for p in phases for c in (run / p / "checkpoints").iterdir()]
    assert len(rows) == len(checkpoints)


def test_training_failure_fails_the_flow_with_the_subprocess_error_in_the_run_log(tmp_path, prefect_server, assets):
    import shutil

    from flows.finetune import finetune

    # Weights that are not safetensors: the preflight (config, tokenizer) passes, the training
    # subprocess fails at model load (and no evaluation beside it can fail first).
    model = tmp_path / "truncated-model"
    shutil.copytree(assets.base_model_dir, model)
    (model / "model.safetensors").write_bytes(b"truncated")
    state = finetune(
        recipe="demo",
        storage_root=str(tmp_path),
        overrides={"model.name_or_path": str(model), "training.epochs": 0.05, "evaluation.devices": None},
        run_id="broken",
        return_state=True,
    )
    assert state.is_failed()
    logs = flow_logs(state.state_details.flow_run_id)
    assert "training of phase phase00 failed" in logs and "safetensors" in logs.lower()
    assert "Traceback" in logs
    checkpoints = Path(tmp_path / "broken" / "phase00" / "checkpoints")
    assert not checkpoints.exists() or all((c / "meta.json").exists() for c in checkpoints.iterdir())


def test_a_failed_gate_fails_the_flow_after_writing_why(tmp_path, prefect_server, assets):
    from flows.finetune import finetune

    state = finetune(
        recipe="demo",
        storage_root=str(tmp_path),
        overrides={
            "phases.0.min_score": {"lab_instruction/rule_acc": 1.01},
            "training.epochs": 0.1,
            "checkpointing.save_every_samples": None,
            "evaluation.limit": 20,
        },
        run_id="gated",
        return_state=True,
    )
    assert state.is_failed()
    assert "lab_instruction/rule_acc" in str(state.message) or "gate failed" in flow_logs(
        state.state_details.flow_run_id
    )
    selection = json.loads((tmp_path / "gated" / "phase00" / "selection.json").read_text())
    assert selection["gate"]["passed"] is False
    assert any("missed by" in r for r in selection["gate"]["reasons"])
    assert not (tmp_path / "gated" / "phase05").exists()  # the next phase never started
    summary = pd.read_csv(tmp_path / "gated" / "report" / "summary.csv")  # the report of what it reached
    assert list(summary["phase"]) == ["base", "phase00"] and summary["gate"].iloc[-1] == "FAIL"


def test_a_demo_arm_stopped_by_a_gate_is_reported_not_raised(tmp_path, prefect_server, assets):
    """`make demo` on a machine where a phase misses its gate still compares the arms: the
    stopped arm is reported up to that phase, with the gate's reasons."""
    from core.recipe import load_recipe
    from flows.demo import run_arm, write_comparison

    recipe = load_recipe(
        "demo",
        {
            "phases.0.min_score": {"lab_instruction/rule_acc": 1.01},
            "training.epochs": 0.1,
            "checkpointing.save_every_samples": None,
            "evaluation.limit": 20,
        },
    )
    path = tmp_path / "gated.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    arm = run_arm.fn(str(path), "phased", str(tmp_path), "gated-phased")
    assert [p.phase for p in arm.phases] == ["phase00"] and arm.phases[0].gate == "FAIL"
    assert "phase phase00: gate failed" in arm.gate_failed and "missed by" in arm.gate_failed
    rows = write_comparison.fn(str(tmp_path / "report"), {"phased": arm}, ["lab_instruction/rule_acc"])
    assert [(r["phase"], r["gate"]) for r in rows] == [("base", ""), ("phase00", "FAIL")]


def test_mt_bench_judges_every_checkpoint_inside_the_flow(tmp_path, prefect_server, assets, monkeypatch):
    from flows.finetune import finetune
    from tests.conftest import mt_bench_settings
    from tests.judge_server import JudgeServer

    monkeypatch.setenv("RECIPE_LAB_TEST_JUDGE_KEY", "sk-test-flow")
    # A judgment cache of its own: the shared one may hold these very judgments from an earlier run.
    monkeypatch.setattr("tasks.finetune.mt_bench_cache_dir", lambda: tmp_path / "judgments")
    with JudgeServer(api_key="sk-test-flow", default=("rating", 6)) as judge:
        overrides = {
            "phases": [
                {
                    "name": "phase00",
                    "data": ["embedded://curriculum/phase00/train.jsonl"],
                    "objective": {"lab_instruction/rule_acc": 1.0, "mt_bench/overall": 0.1},
                }
            ],
            "training.epochs": 0.25,
            "checkpointing.save_every_samples": 256,
            "checkpointing.prune": "keep_selected",
            "evaluation.limit": 10,
            "evaluation.mt_bench": mt_bench_settings(
                judge.base_url,
                "RECIPE_LAB_TEST_JUDGE_KEY",
                question_limit=1,
                categories=["writing", "math"],
                max_new_tokens=8,
            ),
        }
        finetune(recipe="demo", storage_root=str(tmp_path), overrides=overrides, run_id="mt")
    run = tmp_path / "mt" / "phase00"
    models = ["base", *(c.name for c in (run / "eval").iterdir() if c.name != "base")]
    assert len(models) >= 3
    # 2 questions x 2 turns per model (beside training as its answers land); a prompt is asked
    # once, however many models gave the same answers
    answers = [json.loads(line) for m in models for line in (run / "eval" / m / "mt_bench_answers.jsonl").open()]
    assert len(answers) == 2 * len(models)
    prompts = {(a["question_id"], turn, *a["turns"][:turn]) for a in answers for turn in (1, 2)}
    assert len(judge.requests) == len(prompts)
    for name in models:
        result = json.loads((run / "eval" / name / "mt_bench.json").read_text())
        assert result["metrics"]["mt_bench/overall"] == 6.0 and result["error_rate"] == 0.0
    selection = json.loads((run / "selection.json").read_text())
    assert all(c["metrics"]["mt_bench/overall"] == 6.0 for c in selection["candidates"])
    # prune: keep_selected left only the winner on disk (none of them when the start model won)
    winner = selection["winner"]["checkpoint"]
    kept = [] if winner == selection["start"]["checkpoint"] else [winner]
    assert [str(c) for c in (run / "checkpoints").iterdir()] == kept
    assert "sk-test-flow" not in (tmp_path / "mt" / "manifest.json").read_text()


def test_samples_to_peak_equals_the_best_checkpoint_in_the_selection_data(smoke_run):
    from evaluation import report

    _, run = smoke_run
    phases = ["phase00", "phase05", "phase10"]
    metrics = ["lab_instruction/rule_acc", "lab_knowledge/acc", "lab_skills/exact_match"]
    _, _, checkpoints = report.phase_rows(str(run), phases)
    table = report.sample_efficiency(pd.DataFrame([{"run": "e2e", **c} for c in checkpoints]), metrics)

    # Straight from selection.json: every scored checkpoint, at cumulative samples.
    scored, offset = [], 0
    for i, phase in enumerate(phases):
        selection = json.loads((run / phase / "selection.json").read_text())
        for c in ([selection["start"]] if i == 0 else []) + selection["candidates"]:
            scored.append((offset + c["samples"], c["metrics"]))
        offset += json.loads((run / phase / "metrics.jsonl").read_text().splitlines()[-1])["samples_seen"]
    for metric in metrics:
        best = max(m[metric] for _, m in scored)
        row = table[table.metric == metric].iloc[0]
        assert row["best"] == round(best, 4)
        assert row["samples_to_peak"] == min(s for s, m in scored if m[metric] == best)


def test_demo_comparison_is_built_from_flow_results(smoke_run, tmp_path):
    """The glue of the demo flow: finetune results -> comparison table, plot, sample efficiency."""
    from flows.demo import write_comparison

    result, _ = smoke_run
    metrics = ["lab_instruction/rule_acc", "lab_knowledge/acc", "lab_skills/exact_match"]
    rows = write_comparison.fn(str(tmp_path), {"phased": result}, metrics)
    assert [r["phase"] for r in rows] == ["base", "phase00", "phase05", "phase10"]
    assert rows[0]["lab_instruction/rule_acc"] == result.base.metrics["lab_instruction/rule_acc"]
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    efficiency = pd.read_csv(tmp_path / "sample_efficiency.csv")
    assert list(efficiency["metric"]) == metrics


def test_lab_export_loads_stops_at_the_end_of_turn_names_the_winner_and_equals_its_s3_copy(smoke_run, tmp_path, s3):
    import fsspec
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.cli import main
    from tests.conftest import BUCKET

    _, run = smoke_run
    out = tmp_path / "export"
    for target in (str(out), f"s3://{BUCKET}/export"):
        with pytest.raises(SystemExit) as done:
            main(["export", str(run), "--to", target])
        assert done.value.code == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= set(files)
    assert {"chat_template.jinja", "training.png", "scores.png"} <= set(files)
    # The flow's export at the end (export.to) and the bucket's copy are the same bytes.
    assert {p.name: p.read_bytes() for p in (run.parent / "export-e2e").iterdir()} == files
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert {path.rsplit("/", 1)[1]: fs.cat_file(path) for path in fs.find(f"{BUCKET}/export")} == files

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32  # the smoke recipe's training dtype
    # The template's end-of-turn token, read here off a rendered conversation.
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ANSWER"}], tokenize=False
    )
    end_of_turn = tokenizer.convert_tokens_to_ids(rendered.split("ANSWER", 1)[1])
    assert end_of_turn in json.loads(files["generation_config.json"])["eos_token_id"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who rules Zorbia?"}], add_generation_prompt=True, return_tensors="pt"
    )
    generated = model.generate(**prompt, max_new_tokens=64)[0, prompt["input_ids"].shape[1] :].tolist()
    assert generated[-1] == end_of_turn and end_of_turn not in generated[:-1] and len(generated) < 64

    selection = json.loads((run / "phase10" / "selection.json").read_text())  # the last phase
    winner = selection["winner"]
    card = files["README.md"].decode()
    row = next(line for line in card.splitlines() if line.startswith(f"| **{winner['name']}** (selected) |"))
    assert f"| {winner['objective']:.4f} | [{winner['interval'][0]:.4f}, {winner['interval'][1]:.4f}] |" in row
    for key, value in winner["metrics"].items():
        stderr = winner["stderr"].get(key)
        assert (f"{value:.4f} ± {stderr:.4f}" if stderr else f"{value:.4f}") in row, key
    assert all(reason in card for reason in selection["gate"]["reasons"])  # why it was selected
    assert "![training.png](training.png)" in card and "base_model" not in card  # embedded base: no Hub id


def test_export_arguments_are_checked_and_push_to_hub_goes_through_huggingface_hub(smoke_run, tmp_path, capsys):
    from huggingface_hub.errors import OfflineModeIsEnabled

    from evaluation.export import export_run
    from flows.cli import main

    _, run = smoke_run
    for args, message in [
        ([str(run)], "needs a destination"),
        ([str(tmp_path / "nothing"), "--to", str(tmp_path / "x")], "no manifest.json"),
        ([str(run), "--phase", "phase99", "--to", str(tmp_path / "x")], "no phase 'phase99'"),
        ([str(run), "--to", str(run)], "holds the run being exported"),
    ]:
        with pytest.raises(SystemExit) as done:
            main(["export", *args])
        assert done.value.code == 2 and message in capsys.readouterr().err
    assert (run / "manifest.json").exists()  # the refused destination is untouched
    # Offline here, so the Hub push can only be seen reaching huggingface_hub, which refuses it.
    with pytest.raises(OfflineModeIsEnabled):
        export_run(str(run), None, push_to_hub="someone/demo-export")


def test_export_completes_a_generation_config_missing_the_end_of_turn_token(smoke_run, tmp_path):
    """A checkpoint whose generation config stops only at another token (as a base model's
    <|end_of_text|> under a chat template's <|eot_id|>) is exported stopping at both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from evaluation.export import selected, write_model_dir

    _, run = smoke_run
    manifest, recipe, selection = selected(str(run), None)
    checkpoint = tmp_path / "checkpoint"
    source = Path(selection.winner.checkpoint)
    checkpoint.mkdir()
    for f in source.iterdir():
        (checkpoint / f.name).write_bytes(f.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    config = GenerationConfig.from_pretrained(checkpoint)
    config.eos_token_id = tokenizer.pad_token_id  # anything but the end-of-turn token
    config.save_pretrained(checkpoint)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who rules Zorbia?"}], add_generation_prompt=True, return_tensors="pt"
    )
    before = AutoModelForCausalLM.from_pretrained(checkpoint).generate(**prompt, max_new_tokens=48)
    assert before.shape[1] - prompt["input_ids"].shape[1] == 48  # it talks past the end of its turn

    moved = selection.model_copy(update={"winner": selection.winner.model_copy(update={"checkpoint": str(checkpoint)})})
    write_model_dir(str(run), manifest, recipe, moved, tmp_path / "export")
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    exported = json.loads((tmp_path / "export" / "generation_config.json").read_text())
    assert exported["eos_token_id"] == [tokenizer.pad_token_id, end]
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "export").generate(**prompt, max_new_tokens=48)
    assert after[0, -1] == end and after.shape[1] - prompt["input_ids"].shape[1] < 48


def test_an_export_replaces_its_own_earlier_export_and_refuses_a_foreign_directory_without_force(
    smoke_run, tmp_path, capsys
):
    from evaluation.export import is_our_card
    from flows.cli import main

    _, run = smoke_run
    out = tmp_path / "export"
    for _ in range(2):  # the second replaces the first: its card's front matter says it is one of ours
        with pytest.raises(SystemExit) as done:
            main(["export", str(run), "--to", str(out)])
        assert done.value.code == 0
        (out / "left-by-hand.txt").write_text("gone at the next export")
    assert yaml.safe_load((out / "README.md").read_text().split("---\n")[1])["tags"][0] == "recipe-lab"
    assert not is_our_card("# a card\n\ntags:\n  - recipe-lab\n")  # the tag outside any front matter
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    capsys.readouterr()  # the exports' progress bars
    with pytest.raises(SystemExit) as done:
        main(["export", str(run), "--to", str(foreign)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "not empty and holds no earlier recipe-lab export" in err and "--force" in err
    assert (foreign / "notes.txt").read_text() == "mine"  # untouched
    for inside in (run, run.parent):  # --force never replaces the run itself
        with pytest.raises(SystemExit) as done:
            main(["export", str(run), "--to", str(inside), "--force"])
        assert done.value.code == 2 and "holds the run being exported" in capsys.readouterr().err
    assert (run / "manifest.json").exists()
    with pytest.raises(SystemExit) as done:
        main(["export", str(run), "--to", str(foreign), "--force"])
    assert done.value.code == 0 and not (foreign / "notes.txt").exists() and (foreign / "model.safetensors").exists()
