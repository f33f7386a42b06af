"""The vision-language recipes: the real-model ones follow the issue's settings (validated, not run); the demo's
--quick path runs end to end."""

import json

from kdkit.cli.main import main
from kdkit.config.load import read_yaml
from kdkit.config import validate
from kdkit.recipes import recipe_path


def test_qwen2_vl_recipe_follows_the_issue():
    cfg = validate(read_yaml(recipe_path("qwen2_vl_7b_int8_to_qwen2_vl_2b_vqa_kd.yaml")))
    assert cfg.task == "vlm" and cfg.teacher.quantization == "8bit" and cfg.student.dtype == "bfloat16"
    assert cfg.student.lora is None and cfg.student.gradient_checkpointing  # full fine-tuning
    assert cfg.distill.temperature == 3 and {t.kind: t.weight for t in cfg.distill.terms} == {"ce": 0.1, "kd": 0.9}
    t = cfg.train
    assert (t.lr, t.batch_size, t.grad_accum, t.scheduler, t.warmup_steps, t.epochs) == (1e-4, 2, 8, "cosine", 50, 3)
    assert cfg.vlm.min_pixels and cfg.vlm.max_pixels


def test_qwen2_5_vl_recipe_validates():
    cfg = validate(read_yaml(recipe_path("qwen2.5_vl_7b_to_qwen2.5_vl_3b_vqa_kd.yaml")))
    assert cfg.teacher.pretrained == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert cfg.student.pretrained == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_vlm_demo_quick_runs(tmp_path, capsys):
    assert main(["demo", "--task", "vlm", "--quick", "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "Teacher vs distilled student" in out and "distilled - baseline exact match" in out
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert {"exact_match", "f1"} <= metrics["gain"].keys()
