"""`kdkit train` on a causal LM end to end: a tiny Qwen2 teacher saved locally, a student from a config, a tokenizer
trained here, instruction data in jsonl; baseline and distilled students, metrics, export, model card."""

import json

import pytest
import torch

from kdkit.cli.main import main

from conftest import write_yaml
from tiny_lm import save_tiny_lm, tiny_tokenizer

QUESTIONS = [("What is {a} plus {b}?", "{c}"), ("Name the colour number {a}.", "colour {a}")]


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    tiny_tokenizer(tmp / "tok")
    save_tiny_lm(tmp / "teacher", tmp / "tok", hidden=32, layers=2)
    lines = []
    for i in range(120):
        q, a = QUESTIONS[i % 2]
        lines.append(json.dumps({"instruction": q.format(a=i, b=i + 1), "context": "",
                                 "response": a.format(a=i, c=2 * i + 1)}))
    (tmp / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp


def lm_config(tmp, out, **train):
    return {
        "task": "lm", "output_dir": str(out), "seed": 0, "compare_baseline": True,
        "data": {"source": "jsonl", "path": str(tmp / "data.jsonl"), "val_fraction": 0.1, "test_fraction": 0.1,
                 "text": {"max_length": 48}},
        "student": {"hf_config": {"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                  "tie_word_embeddings": False},
                    "tokenizer": str(tmp / "tok")},
        "teacher": {"pretrained": str(tmp / "teacher")},
        "distill": {"temperature": 2.0, "terms": [{"kind": "ce", "weight": 0.1}, {"kind": "kd", "weight": 0.9}]},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 0.003, "eval_every": 2, "save_every": 2, "log_every": 1,
                  "progress": False, "tracker": "none", **train},
        "eval": {"batch_size": 8, "generate_samples": 3, "max_new_tokens": 4},
    }


def test_lm_train_writes_metrics_export_and_model_card(lm_setup, tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", lm_config(lm_setup, tmp_path / "run"))
    assert main(["train", str(config), "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "vocabulary: " in out
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "lm"
    for who in ("teacher", "student", "baseline"):
        m = metrics[who]
        assert m["perplexity"] > 1 and m["tokens"] > 0 and m["params"] > 0
        assert {"rouge_l", "exact_match", "f1", "latency_ms", "throughput"} <= m.keys()
    assert metrics["student"]["kl_from_teacher"] >= 0 and "perplexity" in metrics["gain"]
    assert metrics["compression"] > 1

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "student")
    tok = AutoTokenizer.from_pretrained(run / "student")
    ids = tok("What is 1 plus 2?", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape[-1] == len(tok)
    assert "| Perplexity |" in (run / "student" / "README.md").read_text()
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert {"ce", "kd", "loss"} <= history[0].keys()
    assert [r["step"] for r in history if r["kind"] == "eval"] == [2, 4]


def test_splitting_the_batch_into_micro_batches_gives_the_same_step(lm_setup, tmp_path):
    """Token-mean losses over micro-batches of different token counts: weighted by tokens, the step is the same."""
    from safetensors.torch import load_file

    from kdkit.config import validate
    from kdkit.experiment import train_run

    def run(name, batch, accum):
        cfg = lm_config(lm_setup, tmp_path / name, batch_size=batch, grad_accum=accum, max_steps=2, eval_every=2,
                        save_every=None, export="last")
        cfg["compare_baseline"] = False
        cfg["eval"]["generate_samples"] = 0
        cfg["eval"]["efficiency"] = False
        train_run(validate(cfg))
        return load_file(str(next((tmp_path / name / "student").glob("*.safetensors"))))

    whole, split = run("whole", 8, 1), run("split", 2, 4)
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=1e-5)


def test_llama_pair_with_a_lora_student_trains_and_exports_merged(lm_setup, tmp_path):
    from transformers import AutoModelForCausalLM

    from kdkit.config import validate
    from kdkit.experiment import train_run

    save_tiny_lm(tmp_path / "llama_teacher", lm_setup / "tok", model_type="llama", hidden=32, layers=2)
    save_tiny_lm(tmp_path / "llama_student", lm_setup / "tok", model_type="llama", hidden=16, layers=1)
    cfg = lm_config(lm_setup, tmp_path / "run", max_steps=3, eval_every=3, save_every=None)
    cfg["teacher"] = {"pretrained": str(tmp_path / "llama_teacher")}
    cfg["student"] = {"pretrained": str(tmp_path / "llama_student"),
                      "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    cfg["compare_baseline"] = False
    cfg["eval"]["generate_samples"] = 2
    metrics = train_run(validate(cfg))
    assert metrics["student"]["perplexity"] > 1 and metrics["compression"] > 1
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "llama_student")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")  # plain transformers, no peft
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)  # only the adapted weights moved


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(next((run / "student").glob("*.safetensors"))))


def _quick(cfg):
    cfg["compare_baseline"] = False
    cfg["eval"].update(generate_samples=0, efficiency=False)
    return cfg


def test_two_processes_equal_one_and_a_resume_is_exact(lm_setup, tmp_path):
    """2 processes x 4 samples = 1 process x 8 (token-weighted across ranks); a run cut at step 2 and resumed
    ends bit-identical to the straight one."""
    import shutil

    from kdkit.config import validate
    from kdkit.experiment import train_run
    from kdkit.train import checkpoint as ckpt
    from procs import kdkit_train

    one = _quick(lm_config(lm_setup, tmp_path / "one", batch_size=8, max_steps=4, save_every=2, keep_last=5))
    train_run(validate(one))
    two = write_yaml(tmp_path / "two.yaml", _quick(lm_config(lm_setup, tmp_path / "two", batch_size=4, max_steps=4)))
    done = kdkit_train(two, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)

    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "one", cut)
    shutil.rmtree(cut / "student")
    for d in ckpt.step_checkpoints(cut / "checkpoints"):
        if int(d.name.split("-")[1]) > 2:
            shutil.rmtree(d)
    one["output_dir"] = str(cut)
    train_run(validate(one), resume=True)
    c = _weights(cut)
    assert all(torch.equal(a[k], c[k]) for k in a)
