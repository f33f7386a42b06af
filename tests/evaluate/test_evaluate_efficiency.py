"""measure_efficiency: keys, sane values, shared weights counted once, modes restored."""

import pytest
import torch
from safetensors.torch import save
from torch import nn

from kdkit.evaluate import measure_efficiency, safetensors_size
from kdkit.evaluate.efficiency import _RssPeak, _sig


def small_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.1), nn.Linear(4 * 8 * 8, 10))


def test_keys_and_sane_values():
    model = small_net().train()
    model[1].eval()  # a submodule in its own mode must come back as it was
    n = sum(p.numel() for p in model.parameters())
    out = measure_efficiency(model, torch.randn(1, 1, 8, 8), batch_size=16, repeats=5, warmup=1)
    assert set(out) == {"params", "size_mb", "latency_ms", "throughput", "peak_mem_mb"}
    assert out["params"] == n == 4 * 9 + 4 + 8 + 256 * 10 + 10
    # float32 weights + BN buffers + header: a little over 4 bytes per parameter
    assert 4 * n / 1e6 <= out["size_mb"] < 4 * n / 1e6 + 0.01
    assert out["latency_ms"] > 0 and out["throughput"] > 0 and out["peak_mem_mb"] >= 0
    assert model.training and not model[1].training and model[4].training


def test_eval_mode_restored_too():
    model = small_net().eval()
    measure_efficiency(model, torch.randn(1, 1, 8, 8), batch_size=4, repeats=2, warmup=0)
    assert not any(m.training for m in model.modules())


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 50, bias=False)
        self.head.weight = self.embed.weight  # tied, like a language model's input/output embeddings

    def forward(self, x):
        return self.head(self.embed(x))


def test_shared_weights_counted_once():
    model = Tied()
    out = measure_efficiency(model, torch.zeros(1, 3, dtype=torch.long), batch_size=4, repeats=2, warmup=0)
    assert out["params"] == 400
    assert safetensors_size(model) == len(save({"embed.weight": model.embed.weight.detach()}))


def test_rss_sampler_sees_an_allocation():
    with _RssPeak() as rss:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert rss.growth_bytes >= 0  # approximate by design; usually ~64 MiB, never negative


@pytest.mark.parametrize("x,want", [(12345.67, 12346.0), (4.123456, 4.123), (0.0123456, 0.01235), (0.0, 0.0)])
def test_significant_rounding(x, want):
    assert _sig(x) == want
