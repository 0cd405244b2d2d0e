from pathlib import Path

import pytest
import yaml

from core.recipe import RECIPES_DIR, RecipeError, load_recipe, resolve

ALL_RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def test_the_paper_presets_and_demo_exist():
    assert {p.stem for p in ALL_RECIPES} >= {"lab", "tulu", "tulu-plus", "demo"}


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates(path: Path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    # Smoke and stacked variants of every recipe validate too.
    assert resolve(path, "stacked", smoke_run=True).phases[0].name == "stacked"


def test_paper_table1_presets():
    lab, tulu, plus = (load_recipe(n).training for n in ("lab", "tulu", "tulu-plus"))
    assert (lab.effective_batch_size, lab.warmup_steps, lab.schedule, lab.epochs, lab.learning_rate) == (
        3840,
        25,
        "constant",
        10,
        2e-5,
    )
    assert (tulu.effective_batch_size, tulu.warmup_ratio, tulu.schedule, tulu.epochs, tulu.learning_rate) == (
        128,
        0.03,
        "linear",
        3,
        2e-5,
    )
    assert (plus.effective_batch_size, plus.epochs, plus.learning_rate) == (128, 4, 3e-5)
    assert all((t.adam_beta1, t.adam_beta2) == (0.9, 0.95) for t in (lab, tulu, plus))


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def demo_dict() -> dict:
    return yaml.safe_load((RECIPES_DIR / "demo.yaml").read_text())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["training"].update(learning_rate=-1e-5), "training.learning_rate"),
        (lambda d: d["training"].update(effective_batch_size=0), "training.effective_batch_size"),
        (lambda d: d["training"].update(warmup_ratio=0.1), "training"),  # both warmups set
        (lambda d: d["training"].update(learnign_rate=1e-5), "training.learnign_rate"),
        (lambda d: d.update(stratgy="phased"), "stratgy"),
        (lambda d: d["phases"][1].update(objective={}), "phases.1.objective"),
        (lambda d: d["phases"][0].update(objective={"no_slash": 1.0}), "phases.0.objective"),
        (lambda d: d.update(strategy="sideways"), "strategy"),
    ],
)
def test_bad_recipe_names_file_and_field(tmp_path, change, field):
    data = demo_dict()
    change(data)
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, data))
    message = str(err.value)
    assert str(tmp_path / "r.yaml") in message
    assert any(line.strip().startswith(field) for line in message.splitlines()[1:]), message


def test_overrides_are_dotted_and_validated():
    recipe = load_recipe("demo", {"training.learning_rate": 1e-4, "phases.0.min_gain": 0.5})
    assert recipe.training.learning_rate == 1e-4 and recipe.phases[0].min_gain == 0.5
    with pytest.raises(RecipeError, match="training.learnig_rate"):
        load_recipe("demo", {"training.learnig_rate": 1e-4})


def test_unknown_recipe_name_lists_known_ones():
    with pytest.raises(RecipeError, match="demo"):
        load_recipe("nope")


def test_stacked_mixes_all_phases_and_sums_objectives():
    recipe = resolve("demo", "stacked")
    (phase,) = recipe.phases
    assert len(phase.data) == 3
    assert phase.objective == {"lab_instruction/rule_acc": 1.0, "lab_knowledge/acc": 1.0, "lab_skills/exact_match": 1.0}


def test_cli_validate_reports_fields(tmp_path, capsys):
    from flows.cli import cmd_validate

    data = demo_dict()
    data["training"]["effective_batch_size"] = 0

    class Args:
        recipes = ["demo", str(write(tmp_path, data))]

    assert cmd_validate(Args) == 1
    out = capsys.readouterr()
    assert "demo: ok" in out.out
    assert "training.effective_batch_size" in out.err


def test_stacked_keeps_each_phases_length_split_and_the_parts_survive_restacking():
    split = {"data": ["f.jsonl"], "objective": {"lab_knowledge/acc": 1.0}}
    phases = [{"name": "short", "length_split": "short", **split}, {"name": "long", "length_split": "long", **split}]
    recipe = resolve("demo", "stacked", {"phases": phases, "phases.1.replay": 0.01})
    (phase,) = recipe.phases
    assert [(p.name, p.data, p.length_split, p.replay) for p in phase.stacked_from] == [
        ("short", ["f.jsonl"], "short", 0.0),
        ("long", ["f.jsonl"], "long", 0.01),
    ]
    assert phase.length_split is None and phase.replay == 0
    assert resolve(recipe, "stacked").phases[0].stacked_from == phase.stacked_from
