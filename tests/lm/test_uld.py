"""Different tokenizers: every sample is tokenized by both, the teacher reads its own tokens, and the KD terms are
Universal Logit Distillation on the answer tokens paired in order."""

import json

import pytest
import torch

from kdkit.cli.main import main
from kdkit.config.schema import DataConfig
from kdkit.data.text import build_text_data
from kdkit.errors import ConfigError

from conftest import write_yaml
from test_lm_end_to_end import lm_config, lm_setup  # noqa: F401  (the module fixture)
from tiny_lm import save_tiny_lm, tiny_tokenizer

OTHER_CORPUS = ["What is 3 plus 4? 7", "Name the colour number 12. colour 12", "plus plus colour number"] * 30


@pytest.fixture(scope="module")
def other_teacher(lm_setup):  # noqa: F811
    """A Llama teacher whose tokenizer was trained on other text, with another vocabulary size."""
    tiny_tokenizer(lm_setup / "tok_other", vocab_size=280, corpus=OTHER_CORPUS)
    return save_tiny_lm(lm_setup / "teacher_other", lm_setup / "tok_other", model_type="llama", hidden=32, layers=2)


def _data(lm_setup, **text):  # noqa: F811
    from transformers import AutoTokenizer

    cfg = DataConfig(source="jsonl", path=str(lm_setup / "data.jsonl"), val_fraction=0.1, test_fraction=0.1,
                     text={"max_length": 128, **text})  # long enough that neither tokenization is truncated
    student, teacher = (AutoTokenizer.from_pretrained(lm_setup / d) for d in ("tok", "tok_other"))
    return build_text_data(cfg, student, 0, teacher_tokenizer=teacher), student, teacher


def test_every_sample_carries_the_teachers_own_tokenization(lm_setup, other_teacher):  # noqa: F811
    data, student, teacher = _data(lm_setup)
    for split in (data.train, data.val, data.test):
        assert len(split.teacher) == len(split)
    batch = data.train.get_batch(torch.arange(4))
    assert {"teacher_input_ids", "teacher_attention_mask", "teacher_labels"} <= batch.keys()
    for r in range(4):  # the same answer in both tokenizations, in different tokens
        s_ans = student.decode(batch["labels"][r][batch["labels"][r] != -100])
        t_ans = teacher.decode(batch["teacher_labels"][r][batch["teacher_labels"][r] != -100])
        assert s_ans == t_ans and s_ans.strip()
    assert not torch.equal(batch["input_ids"][:, :5], batch["teacher_input_ids"][:, :5])
    assert data.train[2]["teacher_labels"].tolist() == [
        x for x in batch["teacher_labels"][2].tolist()][:len(data.train[2]["teacher_labels"])]


def test_packing_is_refused_across_tokenizers(lm_setup, other_teacher, tmp_path):  # noqa: F811
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} " * 9}) for i in range(40)))
    from transformers import AutoTokenizer

    cfg = DataConfig(source="jsonl", path=str(tmp_path / "t.jsonl"), text={"max_length": 16, "packing": True})
    with pytest.raises(ConfigError, match="data.text.packing"):
        build_text_data(cfg, AutoTokenizer.from_pretrained(lm_setup / "tok"), 0,
                        teacher_tokenizer=AutoTokenizer.from_pretrained(lm_setup / "tok_other"))


def test_a_teacher_with_another_tokenizer_distils_with_uld(lm_setup, other_teacher, tmp_path, capsys):  # noqa: F811
    cfg = lm_config(lm_setup, tmp_path / "run")
    cfg["teacher"] = {"pretrained": str(other_teacher)}
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "different tokenizers" in out and "Universal Logit Distillation" in out
    assert "computed as ULD" in out  # the recipe's forward_kl term, said once
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    train = [r for r in history if r["kind"] == "train"]
    assert all(r["kd"] > 0 and r["ce"] > 0 for r in train)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "kl_from_teacher" not in metrics["student"]  # no KL across vocabularies
    # the teacher is measured on its own tokenization: its token count differs from the students'
    assert metrics["teacher"]["tokens"] != metrics["student"]["tokens"] == metrics["baseline"]["tokens"]
    assert metrics["teacher"]["perplexity"] > 1 and "rouge_l" in metrics["teacher"]
