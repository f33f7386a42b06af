"""classification_quality against figures computed by hand."""

import pytest
import torch
from torch import nn

from kdkit.errors import DataError
from kdkit.evaluate import classification_quality


class FixedLogits(nn.Module):
    """A linear 'model' whose logits are the pixels themselves (flattened), so each test picks its predictions."""

    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.9)  # would scramble the logits if evaluation left train mode on

    def forward(self, pixels):
        return self.dropout(pixels.flatten(1))


def batch(logits, labels):
    logits = torch.tensor(logits, dtype=torch.float32)
    return {"pixels": logits[:, :, None, None], "labels": torch.tensor(labels), "index": torch.arange(len(labels))}


# 6 classes, so top5 really is top-5 (not every class). Predictions: argmax per row.
B1 = batch([[9, 1, 2, 3, 4, 5],    # label 0: top1 hit
            [0, 9, 1, 2, 3, 4],    # label 0: top1 miss, label is the 6th = last -> top5 miss
            [1, 2, 9, 3, 4, 5]],   # label 3: top1 miss, top5 hit
           [0, 0, 3])
B2 = batch([[0, 1, 2, 3, 4, 9],    # label 5: hit
            [5, 4, 3, 2, 1, 0]],   # label 4: miss, rank 5 -> top5 hit
           [5, 4])


def expected_loss(batches):
    logits = torch.cat([b["pixels"].flatten(1) for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    return nn.functional.cross_entropy(logits, labels).item()


def test_accuracy_top5_loss_by_hand():
    model = FixedLogits().train()
    out = classification_quality(model, [B1, B2], "cpu")
    assert out["samples"] == 5
    assert out["accuracy"] == pytest.approx(40.0)  # 2 of 5
    assert out["top5"] == pytest.approx(80.0)      # 4 of 5
    assert out["loss"] == pytest.approx(expected_loss([B1, B2]), abs=1e-5)
    assert "agreement" not in out
    assert model.training and model.dropout.training  # mode restored


def test_agreement_with_reference():
    # Reference predicts class 0 for everything: agrees with the model on sample 1 of B1 and sample 2 of B2.
    reference = lambda pixels: torch.nn.functional.one_hot(torch.zeros(len(pixels), dtype=torch.long), 6).float()
    out = classification_quality(FixedLogits(), [B1, B2], None, reference=reference)
    assert out["agreement"] == pytest.approx(40.0)


def test_few_classes_top_k_is_all_classes():
    b = batch([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [1, 1, 1])
    out = classification_quality(FixedLogits(), [b], "cpu")
    assert out["accuracy"] == pytest.approx(100 / 3, abs=1e-4)
    assert out["top5"] == 100.0
    assert out["accuracy"] == round(out["accuracy"], 4)


def test_hf_style_output_and_gather():
    class HF(nn.Module):
        def forward(self, pixels):
            return type("Out", (), {"logits": pixels.flatten(1)})()

    calls = []

    def gather(t):  # two identical processes: every per-sample row twice
        calls.append(t.shape)
        return torch.cat([t, t])

    out = classification_quality(HF(), [B1, B2], "cpu", gather=gather, progress=True)
    assert out["samples"] == 10 and out["accuracy"] == pytest.approx(40.0) and out["top5"] == pytest.approx(80.0)
    assert [s[0] for s in calls] == [3, 2]  # per-sample tensors, so gather_for_metrics can drop padding


def test_empty_loader_is_a_data_error():
    with pytest.raises(DataError):
        classification_quality(FixedLogits(), [], "cpu")
