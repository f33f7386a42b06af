"""Several teachers as one (`teacher: {ensemble: [...]}`): members of any architecture and input size, frozen.

Each member is an ImageClassifier, so each resizes and normalises the same augmented batch for itself. The
distiller asks for every member's logits once per step (`member_logits`) and turns them into the target of each loss
term (`soft_target`):
- the combined soft targets P = sum_i w_i softmax(z_i / T), returned as the logits T log P (so that softmax(them / T)
  is P and every kd/dkd loss takes them as it takes one teacher's logits). w_i are the members' normalised weights
  (`weighting: fixed`) or, per sample, weight_i x p_i(true label) renormalised (`weighting: confidence`: a teacher that
  is right about this sample counts more, in the spirit of Zhang et al. 2022, "Confidence-Aware Multi-Teacher KD");
- one member's own logits, for a term that names it (`LossTerm.teacher`).
With `offload`, members live on the CPU and each is moved to the accelerator for its forward, then back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdkit.errors import UserError
from kdkit.models.teacher import FrozenTeacher


class EnsembleModule(nn.Module):
    """The members as one module: `forward(pixels)` -> log of the weighted average of their probabilities (the
    ensemble's prediction at T = 1, what evaluation measures); parameters and fingerprint cover every member."""

    def __init__(self, members: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.members = nn.ModuleDict(members)
        total = sum(weights.values())
        self.weights = {name: w / total for name, w in weights.items()}
        classes = {name: int(m.num_classes) for name, m in members.items()}
        if len(set(classes.values())) != 1:
            raise UserError(f"teacher.ensemble: the members predict different numbers of classes: {classes}")
        self.num_classes = next(iter(classes.values()))
        self.offload_to: torch.device | None = None  # set by EnsembleTeacher with offload

    def member_logits(self, pixels: Tensor) -> dict[str, Tensor]:
        out = {}
        for name, model in self.members.items():
            if self.offload_to is not None:
                model.to(self.offload_to)
            out[name] = model(pixels).float()  # (B, C)
            if self.offload_to is not None:
                model.to("cpu")
        return out

    def forward(self, pixels: Tensor) -> Tensor:
        return combine(self.member_logits(pixels), self.weights, 1.0)


def combine(logits: dict[str, Tensor], weights: dict[str, float], temperature: float,
            labels: Tensor | None = None) -> Tensor:
    """T log sum_i w_i softmax(z_i / T) (B, C): logits whose tempered softmax is the members' weighted average. With
    `labels`, each sample's weights are w_i p_i(label) (at T = 1) renormalised; a sample no member gives any
    probability keeps the fixed weights."""
    names = list(logits)
    z = torch.stack([logits[n].float() for n in names])  # (M, B, C)
    w = torch.tensor([weights[n] for n in names], dtype=z.dtype, device=z.device)[:, None]  # (M, 1)
    w = w.expand(len(names), z.shape[1])  # (M, B)
    if labels is not None:
        right = torch.softmax(z, -1).gather(-1, labels[None, :, None].expand(len(names), -1, 1)).squeeze(-1)  # (M, B)
        conf = w * right
        total = conf.sum(0, keepdim=True)
        w = torch.where(total > 1e-12, conf / total.clamp_min(1e-12), w)
    log_p = torch.log_softmax(z / temperature, -1) + w.clamp_min(1e-30).log()[..., None]  # (M, B, C)
    return temperature * torch.logsumexp(log_p, 0)


class EnsembleTeacher(FrozenTeacher):
    """A FrozenTeacher over an EnsembleModule, with what the distiller needs to build per-term targets."""

    def __init__(self, model: EnsembleModule, device: torch.device | str = "cpu", *, weighting: str = "fixed",
                 offload: bool = False):
        self.weighting = weighting
        self.device = torch.device(device)
        if offload and self.device.type != "cpu":
            self.model = model.eval().requires_grad_(False)  # stays on the CPU; members visit the device in turn
            model.offload_to = self.device
        else:
            super().__init__(model, device)

    @property
    def names(self) -> list[str]:
        return list(self.model.members)

    def member(self, name: str | None = None) -> FrozenTeacher:
        """One member as a FrozenTeacher (the first when `name` is None); for terms that need its inner modules."""
        model = self.model.members[name or self.names[0]]
        return FrozenTeacher(model, self.device)

    def member_logits(self, pixels: Tensor) -> dict[str, Tensor]:
        with torch.inference_mode():
            out = self.model.member_logits(pixels.to(self.device))
        return {name: x.clone() for name, x in out.items()}

    def soft_target(self, logits: dict[str, Tensor], name: str | None, temperature: float,
                    labels: Tensor | None = None) -> Tensor:
        """The teacher logits a loss term learns from: member `name`'s, or the combination (module docstring)."""
        if name is not None:
            return logits[name]
        confident = labels if self.weighting == "confidence" else None
        return combine(logits, self.model.weights, temperature, confident)

    def __call__(self, pixels: Tensor) -> Tensor:
        return combine(self.member_logits(pixels), self.model.weights, 1.0)


def build_ensemble(spec, build, device) -> EnsembleTeacher:
    """`spec` the teacher's ModelConfig with `ensemble`; `build(member_spec, where)` -> ImageClassifier."""
    members, weights = {}, {}
    for m in spec.ensemble:
        members[m.name] = build(m, f"teacher.ensemble.{m.name}")
        weights[m.name] = m.weight
    model = EnsembleModule(members, weights)
    teacher = EnsembleTeacher(model, device, weighting=spec.weighting, offload=spec.offload)
    counts = ", ".join(f"{n} {sum(p.numel() for p in members[n].parameters()) / 1e6:.2f}M x{model.weights[n]:.2f}"
                       for n in members)
    print(f"teacher: an ensemble of {len(members)} ({counts}); soft targets averaged with "
          f"{'per-sample confidence' if spec.weighting == 'confidence' else 'fixed'} weights"
          + ("; members offloaded to the CPU between forwards" if spec.offload else ""), flush=True)
    return teacher
