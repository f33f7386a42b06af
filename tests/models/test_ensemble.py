"""Several teachers as one: the combined soft targets are the members' weighted average at the loss's temperature,
confidence weighting follows each member's probability of the label, and members can visit the device in turn."""

import pytest
import torch
from torch import nn

from kdkit.models.ensemble import EnsembleModule, EnsembleTeacher, combine


class _Fixed(nn.Module):
    """A 'classifier' returning a fixed linear map of the mean pixel: distinct, deterministic members."""

    def __init__(self, seed: int, classes: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(classes, 3, generator=g) * 3)
        self.num_classes = classes

    def forward(self, pixels):
        return pixels.mean((1, 2, 3))[:, None] * self.w[:, 0] + self.w[:, 1] * pixels[:, 0, 0, 0, None] + self.w[:, 2]


def _ensemble(weights=(1.0, 3.0), **kw):
    model = EnsembleModule({"a": _Fixed(0), "b": _Fixed(1)}, dict(zip("ab", weights)))
    return EnsembleTeacher(model, "cpu", **kw)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_the_combined_soft_targets_are_the_weighted_average_at_the_temperature(temperature):
    teacher = _ensemble()
    pixels = torch.rand(6, 1, 4, 4)
    logits = teacher.member_logits(pixels)
    target = teacher.soft_target(logits, None, temperature)
    expected = 0.25 * torch.softmax(logits["a"] / temperature, -1) + 0.75 * torch.softmax(logits["b"] / temperature, -1)
    torch.testing.assert_close(torch.softmax(target / temperature, -1), expected)
    assert torch.equal(teacher.soft_target(logits, "b", temperature), logits["b"])  # a term naming one member
    torch.testing.assert_close(teacher(pixels), combine(logits, {"a": 0.25, "b": 0.75}, 1.0))


def test_confidence_weighting_follows_each_members_probability_of_the_label():
    teacher = _ensemble(weights=(1.0, 1.0), weighting="confidence")
    logits = {"a": torch.tensor([[4.0, 0.0], [0.0, 4.0]]), "b": torch.tensor([[0.0, 4.0], [0.0, 4.0]])}
    labels = torch.tensor([0, 1])
    target = torch.softmax(teacher.soft_target(logits, None, 2.0, labels) / 2.0, -1)
    p = {n: torch.softmax(z, -1) for n, z in logits.items()}
    for i in range(2):
        w = torch.tensor([p["a"][i, labels[i]], p["b"][i, labels[i]]])
        w = w / w.sum()
        expected = w[0] * torch.softmax(logits["a"][i] / 2.0, -1) + w[1] * torch.softmax(logits["b"][i] / 2.0, -1)
        torch.testing.assert_close(target[i], expected)
    # sample 0: member a is right and b wrong, so a dominates; sample 1: both right, equal weights
    assert target[0, 0] > 0.8
    # without labels (evaluation) the fixed weights apply
    torch.testing.assert_close(torch.softmax(teacher.soft_target(logits, None, 1.0) / 1.0, -1),
                               0.5 * p["a"] + 0.5 * p["b"])


def test_offloaded_members_visit_the_device_in_turn_and_return_to_the_cpu(monkeypatch):
    teacher = _ensemble()
    seen = []
    for name, member in teacher.model.members.items():
        member.register_forward_pre_hook(lambda m, a, name=name: seen.append((name, m.w.device.type)))
    teacher.model.offload_to = torch.device("cpu")  # the path a CUDA run takes, with the CPU as its device
    moves = []
    original = nn.Module.to

    def to(self, *a, **k):
        moves.append((type(self).__name__, str(a[0]) if a else str(k)))
        return original(self, *a, **k)

    monkeypatch.setattr(nn.Module, "to", to)
    out = teacher.member_logits(torch.rand(2, 1, 4, 4))
    assert [n for n, _ in seen] == ["a", "b"] and set(out) == {"a", "b"}
    assert moves == [("_Fixed", "cpu"), ("_Fixed", "cpu"), ("_Fixed", "cpu"), ("_Fixed", "cpu")]  # to, back; to, back


def test_members_must_agree_on_the_classes():
    from kdkit.errors import UserError

    with pytest.raises(UserError, match="different numbers of classes"):
        EnsembleModule({"a": _Fixed(0, 5), "b": _Fixed(1, 4)}, {"a": 1.0, "b": 1.0})


def test_the_ensembles_fingerprint_and_parameters_cover_every_member():
    from kdkit.models import fingerprint_model

    teacher = _ensemble()
    assert sum(p.numel() for p in teacher.model.parameters()) == 30
    before = fingerprint_model(teacher.model)
    with torch.no_grad():
        teacher.model.members["b"].w[0, 0] += 1
    assert fingerprint_model(teacher.model) != before


def test_an_ensemble_of_two_architectures_and_input_sizes_distils_end_to_end(tmp_path, capsys):
    """Two members (different widths, one at 16x16 input), the combined targets plus one term per member; the report
    measures the ensemble and each member."""
    import json

    from kdkit.cli.main import main

    from conftest import TINY, tiny_config, write_yaml

    members = [{"name": "small", "factory": f"{TINY}:tiny_mlp", "kwargs": {"hidden": 16, "size": 8, "dropout": 0.0}},
               {"name": "wide", "factory": f"{TINY}:tiny_mlp", "kwargs": {"hidden": 48, "size": 16, "dropout": 0.0},
                "image_size": [16, 16], "weight": 3.0}]
    cfg = tiny_config(tmp_path / "run", teacher={"ensemble": members, "weighting": "confidence"})
    cfg["distill"]["terms"] = [{"kind": "ce", "weight": 0.4}, {"kind": "kd", "weight": 0.4},
                               {"kind": "kd", "weight": 0.2, "name": "kd_wide", "teacher": "wide"}]
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "teacher: an ensemble of 2 (small" in out and "per-sample confidence" in out
    history = [json.loads(x) for x in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    train = [r for r in history if r["kind"] == "train"]
    assert train and all(r["kd"] > 0 and r["kd_wide"] > 0 for r in train)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(m["teacher"]["members"]) == {"small", "wide"}
    assert all(0 <= v["accuracy"] <= 100 for v in m["teacher"]["members"].values())
    small, wide = 8 * 8 * 16 + 16 + 16 * 10 + 10, 16 * 16 * 48 + 48 + 48 * 10 + 10
    assert m["teacher"]["params"] == small + wide


def test_a_term_naming_a_missing_member_is_refused_by_path(tmp_path, capsys):
    from kdkit.cli.main import main

    from conftest import TINY, tiny_config, write_yaml

    members = [{"name": "a", "factory": f"{TINY}:tiny_mlp"}, {"name": "b", "factory": f"{TINY}:tiny_mlp"}]
    cfg = tiny_config(tmp_path / "run", teacher={"ensemble": members})
    cfg["distill"]["terms"] = [{"kind": "kd", "teacher": "c"}]
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert "'c' is not a member of teacher.ensemble (a, b)" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_feature_terms_learn_from_the_member_they_name_else_the_first():
    from kdkit.config.schema import LossTerm
    from kdkit.distill.features import feature_teacher

    teacher = _ensemble()
    assert feature_teacher(teacher, LossTerm(kind="features", teacher="b")) is teacher.model.members["b"]
    assert feature_teacher(teacher, LossTerm(kind="features")) is teacher.model.members["a"]
