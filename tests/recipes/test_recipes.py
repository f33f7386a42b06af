"""Every shipped recipe validates; the offline custom-module recipes run end to end."""

import json

import pytest

from kdkit.cli.main import main
from kdkit.config import load_config, validate
from kdkit.config.load import file_problems, read_yaml
from kdkit.recipes import RECIPES, recipe_path

ALL = sorted(p.name for p in RECIPES.glob("*.yaml"))


@pytest.mark.parametrize("name", ALL)
def test_recipe_validates(name):
    cfg = validate(read_yaml(recipe_path(name)))  # the teachers they name are trained by their own recipes
    assert [p for p, _ in file_problems(cfg)] in ([], ["teacher.run"])
    assert cfg.output_dir.startswith("runs/")
    if cfg.teacher is not None:  # recipe names say <teacher>_to_<student>_<method>
        assert "_to_" in name


def test_cifar_recipes_follow_the_seed_experiments():
    for name in ("cifar100_vit_base_to_vit_tiny_kd.yaml", "cifar100_resnet152_to_resnet18_kd.yaml",
                 "cifar100_vit_base_to_mobilevit_s_kd.yaml"):
        cfg = validate(read_yaml(recipe_path(name)))
        terms = {t.kind: t.weight for t in cfg.distill.terms}
        assert cfg.distill.temperature == 4 and terms == {"ce": 0.5, "kd": 0.5}
        assert cfg.train.lr == 3e-4 and cfg.train.epochs == 10 and cfg.compare_baseline
        teacher_recipe = recipe_path(cfg.teacher.run.removeprefix("runs/") + ".yaml")  # its fine-tuning recipe ships too
        assert load_config(teacher_recipe).teacher is None


def test_custom_module_recipes_run(tmp_path):
    teacher = tmp_path / "teacher"
    assert main(["train", str(recipe_path("digits_teacher.yaml")), f"output_dir={teacher}", "train.epochs=2",
                 "train.progress=false", "--no-report"]) == 0
    out = tmp_path / "kd"
    assert main(["train", str(recipe_path("digits_mlp_to_tiny_mlp_kd.yaml")), f"output_dir={out}", f"teacher.run={teacher}",
                 "train.epochs=2", "train.progress=false"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["compression"] > 10 and "gain" in m
