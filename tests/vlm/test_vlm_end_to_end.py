"""task: vlm end to end on tiny Qwen2-VL models built from configs with a processor built here: answer masks, image
tokens, vocabulary slicing, a teacher with its own processor, bad images, and the CLI run with its report."""

import json
import sys
from pathlib import Path

import pytest
import torch

from kdkit.cli.main import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import write_yaml  # noqa: E402
from tiny_vlm import save_tiny_vlm, tiny_vlm_config  # noqa: E402


@pytest.fixture(scope="module")
def vlm_setup(tmp_path_factory):
    from kdkit.data.shapes import build_processor, generate

    tmp = tmp_path_factory.mktemp("vlm")
    build_processor(tmp / "proc")
    generate(tmp / "shapes", n=80, seed=0, size=32)
    save_tiny_vlm(tmp / "teacher", tmp / "proc", hidden=32, layers=2, vocab_size=400)  # a padded head: 400 rows
    return tmp


def vlm_config(tmp, out, **train):
    return {
        "task": "vlm", "output_dir": str(out), "seed": 0, "compare_baseline": True,
        "data": {"source": "jsonl", "path": str(tmp / "shapes" / "data.jsonl"), "val_fraction": 0.1, "test_fraction": 0.1},
        "student": {"hf_config": tiny_vlm_config(hidden=16), "tokenizer": str(tmp / "proc")},
        "teacher": {"pretrained": str(tmp / "teacher")},
        "distill": {"temperature": 2.0, "terms": [{"kind": "ce", "weight": 0.1}, {"kind": "kd", "weight": 0.9}]},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 0.003, "eval_every": 2, "save_every": 2, "log_every": 1,
                  "progress": False, "tracker": "none", **train},
        "eval": {"batch_size": 4, "generate_samples": 3, "max_new_tokens": 3},
    }


def _data(tmp, **vlm):
    from kdkit.config import validate
    from kdkit.data.vlm import build_vlm_data
    from kdkit.models.vlm import load_processor

    cfg = validate({**vlm_config(tmp, tmp / "unused"), "vlm": vlm})
    proc = load_processor(cfg.student, "student", cfg.vlm)
    return cfg, proc, build_vlm_data(cfg, proc)


def test_labels_fall_on_answer_tokens_and_images_expand_to_their_tokens(vlm_setup):
    cfg, proc, data = _data(vlm_setup)
    batch = data.train.get_batch(torch.arange(4))
    tok = proc.tokenizer
    grid = batch["image_grid_thw"]  # (4, 3): one image per sample
    assert batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    per_image = (grid.prod(-1) // proc.image_processor.merge_size ** 2).tolist()
    assert (batch["input_ids"] == proc.image_token_id).sum(1).tolist() == per_image
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == proc.image_token_id).long())
    for row in range(4):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        record = data.train.records[int(data.train.index[row])]
        assert tok.decode(labelled) == record.messages[-1]["content"] + "<|im_end|>\n"
        assert (batch["labels"][row][batch["attention_mask"][row] == 0] == -100).all()
    prompt, reference = data.test.prompt(0)
    assert tok.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n") and reference


def test_min_and_max_pixels_bound_the_image_tokens(vlm_setup):
    _, _, small = _data(vlm_setup, max_pixels=16 * 16)
    _, _, large = _data(vlm_setup, min_pixels=64 * 64)
    assert small.train.get_batch(torch.arange(1))["image_grid_thw"].prod().item() == 4  # 16x16 -> 2x2 patches of 8
    assert large.train.get_batch(torch.arange(1))["image_grid_thw"].prod().item() == 64  # 64x64 -> 8x8


def test_vlm_train_writes_metrics_export_and_report(vlm_setup, tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", vlm_config(vlm_setup, tmp_path / "run"))
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "teacher head has 400 rows, student 320: losses use the first 320 rows" in out  # Qwen2-VL-7B vs 2B, small
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "vlm" and metrics["compression"] > 1
    for who in ("teacher", "student", "baseline"):
        m = metrics[who]
        assert {"exact_match", "f1", "perplexity", "latency_ms", "throughput", "peak_mem_mb", "avg_new_tokens",
                "params", "size_mb"} <= m.keys()
        assert m["answered"] == 3 and m["perplexity"] > 1
    assert {"exact_match", "f1", "perplexity"} <= metrics["gain"].keys()
    report = (run / "report.md").read_text()
    assert "| Metric | Teacher | Student | Improvement |" in report and "x fewer |" in report
    assert "| Exact match (%) |" in report
    assert "A vision-language model" in (run / "student" / "README.md").read_text()  # the model card
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert {"ce", "kd", "loss"} <= history[0].keys()

    from transformers import AutoModelForImageTextToText

    from kdkit.config.schema import ModelConfig
    from kdkit.models.vlm import load_processor

    model = AutoModelForImageTextToText.from_pretrained(run / "student")  # plain transformers
    proc = load_processor(ModelConfig(pretrained=str(run / "student")), "student")
    assert model.lm_head.weight.shape[0] == len(proc.tokenizer)


def test_a_teacher_with_its_own_processor_reads_its_own_image_tokens(vlm_setup, tmp_path):
    """Another image processing for the teacher (min_pixels raised in its processor): other image-token counts; its
    answer positions are moved onto the student's and training runs, with the vision projector."""
    import shutil

    from kdkit.config import validate
    from kdkit.experiment import train_run

    teacher = tmp_path / "teacher"
    shutil.copytree(vlm_setup / "teacher", teacher)
    cfg_file = teacher / "preprocessor_config.json"
    pre = json.loads(cfg_file.read_text())
    pre["size"]["shortest_edge"] = 48 * 48
    cfg_file.write_text(json.dumps(pre))
    cfg = vlm_config(vlm_setup, tmp_path / "run", max_steps=2, eval_every=2, save_every=None)
    cfg["teacher"] = {"pretrained": str(teacher)}
    cfg["compare_baseline"] = False
    cfg["eval"].update(generate_samples=2, efficiency=False)
    metrics = train_run(validate(cfg))
    assert metrics["teacher"]["answered"] == 2 and metrics["student"]["perplexity"] > 1


def test_realign_moves_teacher_answer_states_onto_student_positions():
    from kdkit.distill.vlm import realign

    s_target = torch.tensor([[-100, -100, 5, 6, -100]])
    t_target = torch.tensor([[-100, -100, -100, -100, 5, 6, -100]])
    t_hidden = torch.arange(7, dtype=torch.float32).view(1, 7, 1)
    assert realign(t_hidden, t_target, s_target).view(-1).tolist() == [0, 0, 4, 5, 0]


def test_vision_feature_matching_adds_a_vision_part(vlm_setup, tmp_path):
    from kdkit.config import validate
    from kdkit.experiment import train_run

    cfg = vlm_config(vlm_setup, tmp_path / "run", max_steps=2, eval_every=2, save_every=None)
    cfg.update(compare_baseline=False, vlm={"vision_feature_weight": 1.0, "freeze_vision": True})
    cfg["eval"].update(generate_samples=0, efficiency=False)
    train_run(validate(cfg))
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert history[0]["vision"] > 0


@pytest.mark.parametrize("problem", ["missing", "unreadable", "bad_json", "no_answer"])
def test_bad_records_exit_2_naming_file_and_line(vlm_setup, tmp_path, capsys, problem):
    lines = (vlm_setup / "shapes" / "data.jsonl").read_text().splitlines()[:20]
    lines = [json.dumps({**json.loads(line), "image": str(vlm_setup / "shapes" / json.loads(line)["image"])})
             for line in lines]
    (tmp_path / "not_an_image.png").write_text("hello")
    bad = {"missing": json.dumps({"image": "nowhere.png", "question": "Q?", "answer": "A"}),
           "unreadable": json.dumps({"image": "not_an_image.png", "question": "Q?", "answer": "A"}),
           "bad_json": "{not json", "no_answer": json.dumps({"image": "not_an_image.png", "question": "Q?"})}[problem]
    lines[2] = bad
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = vlm_config(vlm_setup, tmp_path / "run")
    cfg["data"]["path"] = str(data)
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert f"{data}:3" in err and "Traceback" not in err
    assert {"missing": "nowhere.png", "unreadable": "not_an_image.png", "bad_json": "JSON",
            "no_answer": "answer"}[problem] in err


def test_quantized_teacher_is_refused_on_cpu(vlm_setup, tmp_path, capsys):
    cfg = vlm_config(vlm_setup, tmp_path / "run")
    cfg["teacher"]["quantization"] = "8bit"
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 2
    assert "teacher.quantization" in capsys.readouterr().err


def test_lora_student_trains_and_exports_merged(vlm_setup, tmp_path):
    from transformers import AutoModelForImageTextToText

    from kdkit.config import validate
    from kdkit.experiment import train_run

    save_tiny_vlm(tmp_path / "student", vlm_setup / "proc", hidden=16)
    cfg = vlm_config(vlm_setup, tmp_path / "run", max_steps=2, eval_every=2, save_every=None)
    cfg["student"] = {"pretrained": str(tmp_path / "student"),
                      "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    cfg["compare_baseline"] = False
    cfg["eval"].update(generate_samples=1, efficiency=False)
    train_run(validate(cfg))
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "student").state_dict()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "student").state_dict()
    changed = [k for k, v in merged.items() if not torch.equal(v, base[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)


def test_a_hugging_face_dataset_with_an_image_column_trains(vlm_setup, tmp_path):
    """data.source: hf with a local save_to_disk dataset: images decoded from the dataset's Image column, the
    question and answer columns named by vlm.*_field; the same samples as the jsonl they were made from."""
    import datasets

    rows = [json.loads(line) for line in (vlm_setup / "shapes" / "data.jsonl").read_text().splitlines()]
    table = {"picture": [str(vlm_setup / "shapes" / r["image"]) for r in rows],
             "q": [r["question"] for r in rows], "a": [r["answer"] for r in rows]}
    ds = datasets.Dataset.from_dict(table).cast_column("picture", datasets.Image())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    cfg = vlm_config(vlm_setup, tmp_path / "run", max_steps=2, eval_every=2, save_every=2)
    cfg["data"] = {"source": "hf", "path": str(tmp_path / "hf"), "val_fraction": 0.1, "test_fraction": 0.1}
    cfg["vlm"] = {"image_field": "picture", "question_field": "q", "answer_field": "a"}
    cfg["compare_baseline"] = False
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--no-report"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["student"]["answered"] == 3 and metrics["student"]["perplexity"] > 1

    from kdkit.config import validate
    from kdkit.data.vlm import build_vlm_data
    from kdkit.models.vlm import load_processor

    c = validate(cfg)
    hf = build_vlm_data(c, load_processor(c.student, "student", c.vlm))
    _, _, js = _data(vlm_setup)
    assert len(hf.train) == len(js.train) and len(hf.test) == len(js.test)
    a, b = hf.train.get_batch(torch.arange(4)), js.train.get_batch(torch.arange(4))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
