"""Which student layer learns from which teacher layer: the plan of a run's `features` and `attention` terms.

Built before training from one dry forward of each model (eval mode, no gradient, no random numbers drawn) on a
batch of the data's shape, which gives every module's output shape. Every problem is a UserError naming
`distill.terms.<name>.layers` (or `.num_pairs`, `.mode`, `.per_head`, `.tokens`).

`layers: auto` takes `num_pairs` evenly spaced blocks (kdkit.models.hooks.auto_blocks: ViT encoder layers, CNN
stages or residual blocks) of each model: with n blocks and k pairs, the last block of each of k equal segments
(12 layers, 3 pairs: layers 3, 7, 11), so the last pair is always the last block. k is capped by the shallower
model's block count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from kdkit.config.schema import LossTerm
from kdkit.errors import UserError
from kdkit.losses.features import token_grid
from kdkit.losses.projectors import FeatureProjector
from kdkit.models.hooks import (auto_blocks, display, find_attention, fmt_shape, net_of, resolve_module,
                               trace_shapes)

INNER_KINDS = ("features", "attention")


@dataclass
class Pair:
    student: str                      # the captured module's path, relative to the student's `net`
    teacher: str                      # the same in the teacher
    student_shape: tuple[int, ...]    # per sample: (C, H, W), (N, C), (C,); attention: (heads, N, N)
    teacher_shape: tuple[int, ...]
    projector: str | None = None      # key in the projectors ModuleDict (features)
    note: str = ""                    # how the pair is matched, for the printed plan
    copy: bool = False                # the student's output is changed in place later: capture a copy


@dataclass
class InnerTerm:
    term: LossTerm
    mode: str                         # features | kl | transfer
    pairs: list[Pair] = field(default_factory=list)
    note: str = ""                    # how layers: auto chose, for the printed plan

    @property
    def label(self) -> str:
        return self.term.label


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def spaced(blocks: list[str], k: int) -> list[str]:
    """k evenly spaced items of `blocks`: the last of each of k equal segments."""
    n = len(blocks)
    return [blocks[math.ceil((i + 1) * n / k) - 1] for i in range(k)]


class _Model:
    """One model's traced shapes, and its paths written as messages write them."""

    def __init__(self, model: nn.Module, pixels: torch.Tensor, role: str):
        self.model, self.role, self.pixels = model, role, pixels.to(_device(model))
        self.shapes = trace_shapes(model, self.pixels)
        self.blocks = auto_blocks(model, self.shapes)

    def resolve(self, path: str, where: str) -> str:
        name, _ = resolve_module(self.model, path, where, self.role)
        if self.shapes.get(name, {}).get("shape") is None:
            raise UserError(f"{where}: the {self.role}'s module {display(self.model, name)} does not run (or returns "
                            "no tensor) in a forward pass, so it has no features to match")
        return name

    def attention(self, paths: list[str], where: str) -> list[tuple[str, tuple[int, ...]]]:
        """[(attention module path, per-sample probabilities shape (heads, N, N))] for the blocks at `paths`."""
        found = []
        for p in paths:
            a = find_attention(self.model, p)
            if a is None:
                raise UserError(f"{where}: the {self.role}'s {display(self.model, p)} holds no attention module; "
                                "attention mode: kl is for transformers (use mode: transfer for CNN features)")
            found.append(a)
        named = dict(net_of(self.model).named_modules())
        shapes = trace_shapes(self.model, self.pixels, eager=[named[a] for a in dict.fromkeys(found)])
        out = []
        for a in found:
            shape = (shapes.get(a) or {}).get("attention")
            if shape is None:
                raise UserError(f"{where}: the {self.role}'s {display(self.model, a)} returns no attention "
                                "probabilities, even switched to eager attention; use mode: transfer or a features term")
            out.append((a, shape))
        return out

    def name(self, path: str) -> str:
        return display(self.model, path)


def _layers(term: LossTerm, student: _Model, teacher: _Model, where: str) -> tuple[list[tuple[str, str]], str]:
    """(the (student path, teacher path) pairs, how auto chose them)."""
    if term.layers != "auto":
        if not term.layers:
            raise UserError(f"{where}: give at least one [student path, teacher path] pair, or auto")
        return [(student.resolve(s, where), teacher.resolve(t, where)) for s, t in term.layers], ""
    for m in (student, teacher):
        if not m.blocks:
            raise UserError(f"{where}: auto found no blocks in the {m.role} (modules with parameters in an "
                            "nn.Sequential/nn.ModuleList whose output is a (B, C, H, W) map or (B, N, C) tokens); give "
                            "layers: [[student module path, teacher module path], ...]")
    k = min(term.num_pairs, len(student.blocks), len(teacher.blocks))
    note = (f"layers: auto, {k} of {len(student.blocks)} student and {len(teacher.blocks)} teacher blocks"
            + (f"; num_pairs {term.num_pairs} capped by the shallower model" if k < term.num_pairs else ""))
    return list(zip(spaced(student.blocks, k), spaced(teacher.blocks, k))), note


def _mode(term: LossTerm, pairs: list[tuple[str, str]], student: _Model, teacher: _Model) -> str:
    if term.kind == "features":
        return "features"
    if term.mode != "auto":
        return term.mode
    both_tokens = all(len(student.shapes[s]["shape"]) == 2 and len(teacher.shapes[t]["shape"]) == 2 for s, t in pairs)
    has_attention = all(find_attention(student.model, s) and find_attention(teacher.model, t) for s, t in pairs)
    return "kl" if both_tokens and has_attention else "transfer"


def _as_map_shape(shape: tuple[int, ...], what: str, where: str) -> tuple[int, ...]:
    if len(shape) == 3:
        return shape
    if len(shape) == 2:
        prefix, side = token_grid(shape[0])
        return (shape[1], side, side)
    raise UserError(f"{where}: attention transfer needs feature maps (B, C, H, W) or ViT tokens; the {what} "
                    f"outputs {fmt_shape(shape)} per sample")


def plan_term(term: LossTerm, student: _Model, teacher: _Model, projectors: nn.ModuleDict) -> InnerTerm:
    where = f"distill.terms.{term.label}.layers"
    layer_pairs, note = _layers(term, student, teacher, where)
    mode = _mode(term, layer_pairs, student, teacher)
    plan = InnerTerm(term, mode, note=note)
    if mode == "kl":
        s_att = student.attention([s for s, _ in layer_pairs], where)
        t_att = teacher.attention([t for _, t in layer_pairs], where)
        for (s_path, s_shape), (t_path, t_shape) in zip(s_att, t_att):
            if s_shape[1:] != t_shape[1:]:
                raise UserError(f"{where}: {student.name(s_path)} attends over {s_shape[-1]} tokens and "
                                f"{teacher.name(t_path)} over {t_shape[-1]}: attention kl needs the same token count "
                                "(the same image_size / patch_size); use mode: transfer or a features term")
            if term.per_head and s_shape[0] != t_shape[0]:
                raise UserError(f"distill.terms.{term.label}.per_head: {student.name(s_path)} has {s_shape[0]} heads "
                                f"and {teacher.name(t_path)} {t_shape[0]}; per-head KL needs equal head counts "
                                "(per_head: false averages the heads)")
            note = "per head" if term.per_head else "heads averaged"
            plan.pairs.append(Pair(s_path, t_path, s_shape, t_shape, note=note))
        return plan
    for i, (s_path, t_path) in enumerate(layer_pairs):
        s_shape, t_shape = student.shapes[s_path]["shape"], teacher.shapes[t_path]["shape"]
        copy = bool(student.shapes[s_path].get("inplace"))
        pair_text = f"{student.name(s_path)} {fmt_shape(s_shape)} -> {teacher.name(t_path)} {fmt_shape(t_shape)}"
        if mode == "transfer":
            sm = _as_map_shape(s_shape, f"student's {student.name(s_path)}", where)
            tm = _as_map_shape(t_shape, f"teacher's {teacher.name(t_path)}", where)
            note = f"map {sm[1]}x{sm[2]}" + (f" -> {tm[1]}x{tm[2]}" if sm[1:] != tm[1:] else "")
            plan.pairs.append(Pair(s_path, t_path, s_shape, t_shape, note=note, copy=copy))
            continue
        if len(s_shape) not in (1, 2, 3) or len(t_shape) not in (1, 2, 3):
            raise UserError(f"{where}: {pair_text}: features must be (B, C, H, W) maps, (B, N, C) tokens or (B, C) "
                            "vectors")
        try:
            proj = FeatureProjector(s_shape, t_shape, tokens=term.tokens)
        except ValueError as err:
            raise UserError(f"{where}: {pair_text}: {err}") from None
        key = f"{term.label}__{i}".replace(".", "_")
        projectors[key] = proj
        plan.pairs.append(Pair(s_path, t_path, s_shape, t_shape, projector=key, note=proj.describe(), copy=copy))
    return plan


def build_plan(terms: list[LossTerm], student_model: nn.Module, teacher_models: dict[str, nn.Module],
               pixels: torch.Tensor) -> tuple[list[InnerTerm], nn.ModuleDict]:
    """(the plan of every features/attention term, the projectors of the features terms, in term order).
    `teacher_models`: the teacher module each term learns from (by term label)."""
    student = _Model(student_model, pixels, "student")
    traced: dict[int, _Model] = {}
    projectors = nn.ModuleDict()
    plans = []
    for term in terms:
        if term.kind not in INNER_KINDS:
            continue
        model = teacher_models[term.label]
        if id(model) not in traced:  # each teacher module is traced once
            traced[id(model)] = _Model(model, pixels, "teacher")
        teacher = traced[id(model)]
        plans.append(plan_term(term, student, teacher, projectors))
    return plans, projectors


def describe_plan(plans: list[InnerTerm], student: nn.Module, teachers: dict[str, nn.Module], batch_shape,
                  projectors: nn.ModuleDict, projector_lr: float | None, lr: float) -> list[str]:
    """The lines printed before training."""
    lines = []
    for p in plans:
        t = p.term
        what = {"features": f"{t.distance}" + (", CLS token" if t.tokens == "cls" else ""),
                "kl": "KL(teacher || student) of attention probabilities" + (", per head" if t.per_head else ""),
                "transfer": "attention transfer (Zagoruyko & Komodakis)"}[p.mode]
        how = "student -> teacher, projector" if p.mode == "features" else "student -> teacher"
        lines.append(f"{t.label}: {len(p.pairs)} pair{'s' if len(p.pairs) != 1 else ''} ({how}), {what}, "
                     f"weight {t.weight:g}" + (f" ({p.note})" if p.note else ""))
        teacher = teachers[t.label]
        for pair in p.pairs:
            lines.append(f"  {display(student, pair.student)} ({fmt_shape(pair.student_shape)}) -> "
                         f"{display(teacher, pair.teacher)} ({fmt_shape(pair.teacher_shape)}), {pair.note}")
        if p.mode == "kl":
            lines.append("  those attention modules compute eager attention, which returns the probabilities (the "
                         "student's for the whole run, the teacher's during its forward); other layers and the exported "
                         "student keep the model's attention implementation")
    n = sum(p.numel() for p in projectors.parameters())
    if len(projectors):
        lines.append(f"projectors: {n:,} parameters, learning rate {projector_lr or lr:g}"
                     f"{'' if projector_lr else ' (train.lr)'}, saved in checkpoints, not in student/")
    lines.append(f"(shapes from one dry forward of each model on a {fmt_shape(tuple(batch_shape))} batch)")
    return lines
