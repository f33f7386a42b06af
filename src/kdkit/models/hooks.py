"""Inner outputs of a model by dotted module path, with forward hooks that live only as long as they are needed.

Paths are relative to the `ImageClassifier`'s `net` (`features.3`, `vit.layers.5`); a leading `net.` is accepted
too, and every message writes them with it (`net.features.3`), as `model.named_modules()` of the classifier does.

    with FeatureCapture(model, {"net.features.3": select_output}) as cap:
        logits = model(pixels)
        feats = cap.take()          # {path: tensor}; the capture keeps no reference afterwards
    # the hooks are gone here

`auto_blocks` names the modules `layers: auto` chooses from (see its docstring), from one traced forward.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.errors import UserError


def first_tensor(out: Any) -> Tensor | None:
    """A module's output as one tensor: itself, the first element of a tuple/list, or the first value of a mapping
    (a Hugging Face ModelOutput)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out:
        return first_tensor(out[0])
    return None


def attention_weights(out: Any) -> Tensor | None:
    """The attention probabilities (B, heads, N, N) a Hugging Face attention module returns beside its output
    (second element) in eager mode; None when it returned none (sdpa and flash attention return None)."""
    if isinstance(out, (tuple, list)) and len(out) > 1 and isinstance(out[1], Tensor) and out[1].dim() == 4:
        return out[1]
    return None


def net_of(model: nn.Module) -> nn.Module:
    """Paths are relative to an ImageClassifier's `net`; any other module is its own base."""
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def module_paths(model: nn.Module) -> list[str]:
    """Every submodule's path as messages write it (`net.` + its path in `net`)."""
    prefix = "net." if net_of(model) is not model else ""
    return [f"{prefix}{name}" for name, _ in net_of(model).named_modules() if name]


def display(model: nn.Module, path: str) -> str:
    return f"net.{path}" if net_of(model) is not model else path


def resolve_module(model: nn.Module, path: str, where: str, role: str = "student",
                   named: dict[str, nn.Module] | None = None) -> tuple[str, nn.Module]:
    """(path relative to `net`, the module) for a dotted path with or without a leading `net.`; a UserError naming
    `where` (e.g. distill.terms.features.layers) with the closest existing paths when there is no such module."""
    base = net_of(model)
    modules = named if named is not None else dict(base.named_modules())
    candidates = [path] + ([path[4:]] if path.startswith("net.") and base is not model else [])
    for c in candidates:
        if c and c in modules:
            return c, modules[c]
    known = module_paths(model)
    close = difflib.get_close_matches(path, known, n=3, cutoff=0.5)
    if not close and base is not model:
        close = [display(model, c) for c in difflib.get_close_matches(path.removeprefix("net."), list(modules), n=3)]
    hint = f"did you mean {' or '.join(close)}?" if close else "its modules: " + ", ".join(known[:12]) + (
        ", ..." if len(known) > 12 else "")
    raise UserError(f"{where}: the {role} has no module {path!r}; {hint}")


class FeatureCapture:
    """Forward hooks on the modules at `paths` ({path: select}, `select` turning the module's output into the
    tensor to keep: `first_tensor` by default). Registered on `__enter__`, removed on `__exit__` (also on an
    error), which also drops every captured tensor. The attention modules at `eager` compute eager attention
    (which returns the probabilities) while the capture is entered. A module called twice in one forward keeps its
    last output. Nothing is detached: a student's features keep their graph.

    `clone`: True (every path) or the paths whose output is copied as it is captured. A copy is needed
    - under `torch.inference_mode()` (the teacher): the copy is made outside inference mode, so it is an ordinary
      tensor that can be a loss's target (as FrozenTeacher does with the logits);
    - when a later in-place operation of the model changes the output (BatchNorm followed by ReLU(inplace=True)).
    Elsewhere the captured tensor is the model's own, which costs no memory: the model keeps it for its backward
    anyway. `take()` refuses (UserError) an uncopied output that was changed in place after its capture."""

    def __init__(self, model: nn.Module, paths: dict[str, Callable[[Any], Tensor | None]] | list[str],
                 where: str = "layers", role: str = "student", eager: list[str] = (),
                 clone: bool | set[str] = True):
        if not isinstance(paths, dict):
            paths = {p: first_tensor for p in paths}
        named = dict(net_of(model).named_modules())
        self.modules = {p: (resolve_module(model, p, where, role, named)[1], select) for p, select in paths.items()}
        self.eager = [resolve_module(model, p, where, role, named)[1] for p in eager]
        self.clone = set(paths) if clone is True else set(clone or ())
        self.where, self.role, self.model = where, role, model
        self.outputs: dict[str, Tensor | None] = {}
        self._versions: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._eager_ctx = None

    def __enter__(self) -> "FeatureCapture":
        self._eager_ctx = eager_attention(self.eager)
        self._eager_ctx.__enter__()
        for path, (module, select) in self.modules.items():
            def hook(_module, _inputs, output, path=path, select=select):
                t = select(output)
                if t is not None and path in self.clone:
                    with torch.inference_mode(False):
                        t = t.clone()
                elif t is not None and not t.is_inference():
                    self._versions[path] = t._version
                self.outputs[path] = t
            self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.outputs.clear()
        self._versions.clear()
        if self._eager_ctx is not None:
            self._eager_ctx.__exit__(None, None, None)
            self._eager_ctx = None

    def take(self) -> dict[str, Tensor | None]:
        """What was captured since the last take (missing paths: their module did not run); forgets it."""
        out = dict(self.outputs)
        for path, version in self._versions.items():
            if out.get(path) is not None and out[path]._version != version:
                raise UserError(f"{self.where}: the {self.role}'s {display(self.model, path)} output was changed in "
                                "place later in the forward pass (e.g. by ReLU(inplace=True)), after it was captured; "
                                "capture the module that does it, or the block around both")
        self.outputs.clear()
        self._versions.clear()
        return out


def _eager_switch(module: nn.Module) -> tuple[Any, Any] | None:
    """(the module's own config, an eager copy of it) for a Hugging Face attention module that reads
    `self.config._attn_implementation` at each call; None when it has no such config or is eager already."""
    cfg = getattr(module, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if cfg is None or not hasattr(cfg, "_attn_implementation_internal") or impl == "eager":
        return None
    eager = copy.copy(cfg)  # shallow: only this module sees it; the model's config (and its export) is unchanged
    eager._attn_implementation_internal = "eager"
    return cfg, eager


def use_eager_attention(modules: list[nn.Module]) -> int:
    """Switch these Hugging Face attention modules to eager attention for good (the student's, for the whole run:
    gradient checkpointing recomputes a layer in the backward pass, which must compute what the forward did);
    the model's own config, hence its export, is unchanged. Returns how many were switched."""
    switches = [(m, s) for m in modules if (s := _eager_switch(m)) is not None]
    for m, (_, eager) in switches:
        m.config = eager
    return len(switches)


@contextmanager
def eager_attention(modules: list[nn.Module]):
    """Within the block, these Hugging Face attention modules compute eager attention (which returns the
    attention probabilities); every other layer keeps its implementation (sdpa, flash), and so does evaluation."""
    switches = [(m, s) for m in modules if (s := _eager_switch(m)) is not None]
    for m, (_, eager) in switches:
        m.config = eager
    try:
        yield
    finally:
        for m, (own, _) in switches:
            m.config = own


def trace_shapes(model: nn.Module, pixels: Tensor, eager: list[nn.Module] = ()) -> dict[str, dict[str, Any]]:
    """One forward (eval mode, no gradient, no RNG drawn) recording, for every submodule of `net` that ran, in the
    order the modules finished: the per-sample shape of its output (`shape`), of the attention probabilities it
    returned (`attention`, eager modules only), and whether a later in-place operation changed its output
    (`inplace`: such a capture must be copied). The model's training mode is restored."""
    base = net_of(model)
    seen: dict[str, dict[str, Any]] = {}
    kept: dict[str, tuple[Tensor, int]] = {}
    handles = []
    for name, module in base.named_modules():
        if not name:
            continue

        def hook(_m, _i, out, name=name):
            t, a = first_tensor(out), attention_weights(out)
            seen[name] = {"shape": tuple(t.shape[1:]) if t is not None else None,
                          "attention": tuple(a.shape[1:]) if a is not None else None}
            if t is not None:
                kept[name] = (t, t._version)
        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), eager_attention(list(eager)):  # not inference mode: tensors keep version counters
            model(pixels)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, (t, version) in kept.items():
        seen[name]["inplace"] = t._version != version
    return seen


def is_feature(shape: tuple[int, ...] | None) -> bool:
    """A map (C, H, W) with H*W > 1 or tokens (N, C) with N > 1 (per sample)."""
    return shape is not None and ((len(shape) == 3 and shape[1] * shape[2] > 1) or (len(shape) == 2 and shape[0] > 1))


def auto_blocks(model: nn.Module, shapes: dict[str, dict[str, Any]]) -> list[str]:
    """The blocks `layers: auto` picks from, in forward order: modules with parameters that are direct children of
    an nn.Sequential or nn.ModuleList and output a feature map (B, C, H, W) with H*W > 1 or tokens (B, N, C) with
    N > 1; a block inside another block is dropped. That is the encoder layers of a ViT (`vit.layers.N`), the
    stages of a Hugging Face ResNet or MobileViT, the residual blocks of a torchvision/timm ResNet (`layer2.1`),
    and the conv/BN/ReLU blocks of a plain nn.Sequential CNN (kdkit.models.zoo: `0`, `1`, `3`, ...). Pooling and
    activation layers (no parameters) and the pooled (B, C, 1, 1) end of a network are never blocks."""
    base = net_of(model)
    parents = {name: module for name, module in base.named_modules()}
    found = []
    for name, info in shapes.items():  # forward (completion) order
        parent_name, _, _ = name.rpartition(".")
        parent = parents.get(parent_name)
        module = parents.get(name)
        if (isinstance(parent, (nn.Sequential, nn.ModuleList)) and module is not None
                and any(True for _ in module.parameters()) and is_feature(info["shape"])):
            found.append(name)
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def find_attention(model: nn.Module, path: str) -> str | None:
    """The attention module at or inside the module at `path` (relative to `net`): the first whose class name ends
    in 'Attention' (ViTAttention), in registration order; None when there is none."""
    base = net_of(model)
    module = dict(base.named_modules())[path]
    for name, sub in module.named_modules():
        if type(sub).__name__.endswith("Attention"):
            return f"{path}.{name}" if name else path
    return None


def fmt_shape(shape: tuple[int, ...] | None) -> str:
    return "x".join(str(s) for s in shape) if shape else "?"
