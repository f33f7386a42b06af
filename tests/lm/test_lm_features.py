"""`features` terms for language models: the student's last hidden states, through a projector, matched to the
teacher's on the labelled positions; the projector trains, sits in checkpoints and stays out of student/."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kdkit.cli.main import main
from kdkit.config.schema import LossTerm
from kdkit.distill.lm_features import LMStudentWithProjector
from kdkit.losses.features import feature_distance

from conftest import write_yaml
from lm.test_lm_end_to_end import lm_config, lm_setup  # noqa: F401  (the module fixture)


class _Hidden(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 4)

    def forward(self, ids, mask=None):
        return self.emb(ids)


@pytest.mark.parametrize("distance", ["mse", "cosine", "smooth_l1"])
def test_the_term_is_the_distance_of_projected_student_rows_to_the_teachers_at_labelled_positions(distance):
    torch.manual_seed(0)
    student = _Hidden()
    wrapper = LMStudentWithProjector(student, [LossTerm(kind="features", distance=distance)], 4, 6)
    ids = torch.randint(0, 20, (2, 5))
    teacher_hidden = torch.randn(2, 5, 6)
    keep = torch.tensor([[False, True, True, False, False], [True, True, True, True, False]])
    hidden, parts = wrapper(ids, None, teacher_hidden=teacher_hidden, keep=keep)
    assert torch.equal(hidden, student(ids))
    expected = feature_distance(wrapper.projectors["features"](student(ids)[keep]), teacher_hidden[keep], distance)
    torch.testing.assert_close(parts["features"], expected)
    parts["features"].backward()
    assert wrapper.projectors["features"].weight.grad.abs().sum() > 0 and student.emb.weight.grad.abs().sum() > 0
    same = LMStudentWithProjector(student, [LossTerm(kind="features")], 4, 4)
    assert isinstance(same.projectors["features"], torch.nn.Identity)  # equal widths: no projector


def test_a_features_term_trains_end_to_end_and_stays_out_of_the_export(lm_setup, tmp_path, capsys):  # noqa: F811
    cfg = lm_config(lm_setup, tmp_path / "run")
    cfg["compare_baseline"] = False
    cfg["distill"]["projector_lr"] = 0.01
    cfg["distill"]["terms"] = [{"kind": "ce", "weight": 0.5}, {"kind": "kd", "weight": 0.5},
                               {"kind": "features", "name": "hidden", "weight": 1.0, "distance": "cosine"}]
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "hidden: the student's last hidden states -> the teacher's, cosine, weight 1, linear 16->32" in out
    assert "projectors: 544 parameters, learning rate 0.01" in out
    run = tmp_path / "run"
    train = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert train and all(0 < r["hidden"] <= 2 and r["kd"] > 0 for r in train)
    exported = load_file(str(run / "student" / "model.safetensors"))
    assert not any("projector" in k for k in exported)
    ckpt = next(run.glob("checkpoints/step-*"))
    saved = {k for f in ckpt.glob("*.safetensors") for k in load_file(str(f))}
    assert any("projectors.hidden" in k for k in saved), sorted(saved)[:5]
    # the plain student reloads
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run / "student").config.hidden_size == 16


def test_lm_features_terms_refuse_what_they_cannot_do(lm_setup, tmp_path, capsys):  # noqa: F811
    for term, words in (({"kind": "features", "layers": [["model.layers.0", "model.layers.1"]]},
                         "distill.terms.features.layers: for language models a features term matches the last"),
                        ({"kind": "attention"}, "attention terms are for task: classification")):
        cfg = lm_config(lm_setup, tmp_path / "run")
        cfg["distill"]["terms"] = [{"kind": "ce"}, term]
        assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
