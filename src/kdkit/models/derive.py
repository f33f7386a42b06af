"""Students derived from their teacher: the teacher's Hugging Face config with fewer layers, a narrower width or other
overrides, initialised from the teacher's own weights (`student.derive_from: teacher`).

Families: ViT-like image classifiers (vit, deit), BERT-like encoders (bert, roberta, xlm-roberta, camembert,
distilbert) and Llama-like decoders (llama, mistral, qwen2, qwen3, gemma, olmo, olmo2, smollm3). kdkit trains the
first through task: classification and the last through task: lm; kdkit has no text-classification task, so encoders
are derived at the module level only: `derive_model(BertForSequenceClassification.from_pretrained(...),
num_layers=6)` gives a student of the teacher's own class (classification head included when the teacher has one).

init: teacher_layers (DistilBERT, Sanh et al. 2019): the embeddings, the final norm, the pooler and the head are
copied, and student layer i is teacher layer floor(i * L_t / L_s): every k-th layer, starting with the first
(12 -> 6: 0, 2, 4, 6, 8, 10; 12 -> 4: 0, 3, 6, 9). Where the width is the same the copies are exact. Where the
student is narrower (hidden_size, intermediate_size, attention heads or head dim), each weight keeps evenly spaced
rows and columns of the teacher's: index j of a dimension that shrinks from D to d is teacher index
floor(j * D / d), the same indices for the same dimension in every tensor ("uniform" weight selection with
consistency, Xu et al. 2023, "Initializing Models with Larger Ones"). Attention projections are selected by head:
evenly spaced heads (query heads and key/value heads apart), and within each head evenly spaced dims, which keeps
the rotary-embedding pairs (j, j + head_dim / 2) together (and their frequencies, at integer ratios). A tensor the
teacher cannot fill (a dimension that is neither of these, e.g. a vocabulary resized in `overrides`) keeps its random
initialisation, and the printed summary says so. init: random: the derived config with fresh weights.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from kdkit.errors import UserError

VISION = ("vit", "deit")
ENCODERS = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert")
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "olmo2", "smollm3")
SUPPORTED = (f"ViT-like image classifiers ({', '.join(VISION)}), BERT-like encoders ({', '.join(ENCODERS)}) and "
             f"Llama-like decoders ({', '.join(DECODERS)})")
_INTERMEDIATE = {"distilbert": "hidden_dim"}  # else intermediate_size
_PER_LAYER = ("layer_types", "no_rope_layers")  # config lists with one entry per layer: follow the copied layers
_DROP = ("_name_or_path", "transformers_version", "quantization_config", "_commit_hash")

_LAYER = re.compile(r"(^|\.)(layers|layer|blocks)\.(\d+)\.")
_Q = {"q_proj", "query", "q_lin"}
_KV = {"k_proj", "v_proj", "key", "value", "k_lin", "v_lin"}
_O = {"o_proj", "out_lin", "out_proj"}
_HEAD_NORM = {"q_norm": "q", "k_norm": "kv"}


@dataclass
class Derivation:
    """The student's config and how it relates to the teacher's."""

    config: Any
    model_type: str
    mapping: list[int]  # student layer i <- teacher layer mapping[i]
    teacher_layers: int
    dims: dict[str, tuple[int, int]]  # hidden, intermediate, heads, kv_heads, head_dim: (teacher, student)


def layer_mapping(teacher_layers: int, student_layers: int) -> list[int]:
    """Student layer i <- teacher layer floor(i * L_t / L_s) (DistilBERT's every other layer for 12 -> 6)."""
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def even_indices(teacher: int, student: int) -> torch.Tensor:
    """Evenly spaced indices: student index j <- teacher index floor(j * teacher / student)."""
    return torch.arange(student) * teacher // student


def _key(cfg: Any, name: str) -> str:
    return getattr(cfg, "attribute_map", {}).get(name, name)


def derive_config(teacher_config: Any, *, num_layers: Optional[int] = None, hidden_size: Optional[int] = None,
                  overrides: Optional[dict] = None, init: str = "teacher_layers", where: str = "student") -> Derivation:
    """The student's config: the teacher's with `num_layers`, `hidden_size` and `overrides`; UserError naming
    `<where>.<field>` when the teacher is not of a supported family or the student would not fit it."""
    model_type = getattr(teacher_config, "model_type", None)
    if model_type not in VISION + ENCODERS + DECODERS:
        raise UserError(f"{where}.derive_from: the teacher is a {model_type!r} model; a student is derived from "
                        f"{SUPPORTED}")
    overrides = dict(overrides or {})
    keys = {"layers": _key(teacher_config, "num_hidden_layers"), "hidden": _key(teacher_config, "hidden_size"),
            "intermediate": _INTERMEDIATE.get(model_type, "intermediate_size")}
    heads_key, kv_key = _key(teacher_config, "num_attention_heads"), "num_key_value_heads"
    for name in list(overrides):
        real = _key(teacher_config, name)
        if real in (keys["layers"], keys["hidden"]):
            field_name = "num_layers" if real == keys["layers"] else "hidden_size"
            raise UserError(f"{where}.overrides.{name}: set {where}.{field_name} instead")
        if not hasattr(teacher_config, name):
            close = difflib.get_close_matches(name, list(teacher_config.to_dict()), n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise UserError(f"{where}.overrides.{name}: the teacher's {model_type} config has no such key{hint}")
        overrides[real] = overrides.pop(name)
    l_t = int(getattr(teacher_config, keys["layers"]))
    l_s = num_layers or l_t
    if l_s > l_t:
        raise UserError(f"{where}.num_layers: {l_s} is more than the teacher's {l_t} layers ({keys['layers']}); a "
                        f"derived student has at most the teacher's depth")
    mapping = layer_mapping(l_t, l_s)
    d = teacher_config.to_dict()
    for k in _DROP:
        d.pop(k, None)
    h_t, nh_t = int(d[keys["hidden"]]), int(d[heads_key])
    i_t = int(d[keys["intermediate"]])
    kv_t = int(d.get(kv_key) or nh_t)
    hd_t = int(d.get("head_dim") or h_t // nh_t)
    d[keys["layers"]], d[keys["hidden"]] = l_s, hidden_size or h_t
    d.update(overrides)
    h_s, nh_s, i_s = int(d[keys["hidden"]]), int(d[heads_key]), int(d[keys["intermediate"]])
    derived_head_dim = d.get("head_dim") is None or (teacher_config.to_dict().get("head_dim") == h_t // nh_t
                                                     and "head_dim" not in overrides)
    if derived_head_dim and h_s % nh_s:
        raise UserError(f"{where}.hidden_size: {h_s} is not divisible by the {nh_s} attention heads; set "
                        f"{where}.overrides.{heads_key} to a divisor of it")
    if d.get("head_dim") is not None and derived_head_dim:
        d["head_dim"] = h_s // nh_s
    hd_s = int(d.get("head_dim") or h_s // nh_s)
    kv_s = nh_s
    if kv_key in d:
        if kv_key not in overrides:  # multi-head stays multi-head; grouped queries keep their group size
            group = nh_t // kv_t
            d[kv_key] = kv_s = nh_s // group if nh_s % group == 0 else math.gcd(nh_s, kv_t)
        kv_s = int(d[kv_key])
        if nh_s % kv_s:
            raise UserError(f"{where}.overrides.{kv_key}: {kv_s} does not divide the {nh_s} attention heads")
    for k in _PER_LAYER:
        if isinstance(d.get(k), list) and len(d[k]) == l_t and k not in overrides:
            d[k] = [d[k][m] for m in mapping]
    dims = {"hidden": (h_t, h_s), "intermediate": (i_t, i_s), "heads": (nh_t, nh_s), "kv_heads": (kv_t, kv_s),
            "head_dim": (hd_t, hd_s)}
    if init == "teacher_layers":
        field_of = {"hidden": f"{where}.hidden_size", "intermediate": f"{where}.overrides.{keys['intermediate']}",
                    "heads": f"{where}.overrides.{heads_key}", "kv_heads": f"{where}.overrides.{kv_key}",
                    "head_dim": f"{where}.overrides.{heads_key}"}
        for name, (t, s) in dims.items():
            if s > t:
                raise UserError(f"{field_of[name]}: the student's {name.replace('_', ' ')} ({s}) is larger than the "
                                f"teacher's ({t}); init: teacher_layers only narrows the teacher's weights (use "
                                f"{where}.init: random for a wider student)")
    try:
        config = type(teacher_config)(**d)
    except Exception as err:  # the family's own validation of the combination
        raise UserError(f"{where}.overrides: the derived {model_type} config is invalid: "
                        f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from None
    return Derivation(config, model_type, mapping, l_t, dims)


# --------------------------------------------------------------------------------------------------- weights

def _head_rows(plan: Derivation, heads: str) -> torch.Tensor:
    """Rows of a (heads x head_dim, ...) projection: evenly spaced heads, evenly spaced dims within each. With even
    head dims, dim j + hd/2 is kept exactly when dim j is, so rotary embeddings' rotate_half pairs stay together."""
    (n_t, n_s), (hd_t, hd_s) = plan.dims[heads], plan.dims["head_dim"]
    return (even_indices(n_t, n_s)[:, None] * hd_t + even_indices(hd_t, hd_s)[None, :]).flatten()


def _index(name: str, dim: int, t: int, s: int, plan: Derivation) -> Optional[torch.Tensor] | bool:
    """The teacher indices kept along `dim` of parameter `name`: a tensor, None (all of them), False (none fit)."""
    ix = _select(name, dim, t, s, plan)
    if isinstance(ix, torch.Tensor) and t == s and torch.equal(ix, torch.arange(t)):
        return None
    return ix


def _select(name: str, dim: int, t: int, s: int, plan: Derivation) -> Optional[torch.Tensor] | bool:
    parts = name.split(".")
    leaf = parts[-2] if len(parts) > 1 else ""
    if leaf in _Q and dim == 0:
        return _head_rows(plan, "heads")
    if leaf in _KV and dim == 0:
        return _head_rows(plan, "kv_heads")
    if (leaf in _O or name.endswith("attention.output.dense.weight")) and dim == 1:
        return _head_rows(plan, "heads")
    if leaf in _HEAD_NORM and dim == 0:
        heads = "heads" if _HEAD_NORM[leaf] == "q" else "kv_heads"
        if t == plan.dims["head_dim"][0]:
            return even_indices(*plan.dims["head_dim"])
        return _head_rows(plan, heads)
    if t == s:
        return None
    for name_ in ("hidden", "intermediate"):
        if (t, s) == plan.dims[name_]:
            return even_indices(t, s)
    return False


def _teacher_name(name: str, mapping: list[int]) -> str:
    return _LAYER.sub(lambda m: f"{m.group(1)}{m.group(2)}.{mapping[int(m.group(3))]}.", name, count=1)


@torch.no_grad()
def copy_teacher_weights(student: nn.Module, teacher: nn.Module, plan: Derivation) -> dict[str, Any]:
    """Fill `student` from `teacher` per `plan` (layers by plan.mapping, weight selection where narrower);
    returns {"selected": [names], "random": [names the teacher cannot fill]}."""
    source = teacher.state_dict()
    selected, kept = [], []
    for name, p in student.named_parameters():
        t = source.get(_teacher_name(name, plan.mapping))
        if t is None or t.dim() != p.dim():
            kept.append(name)
            continue
        index = [_index(name, d, t.shape[d], p.shape[d], plan) for d in range(p.dim())]
        if any(ix is False for ix in index):
            kept.append(name)
            continue
        for d, ix in enumerate(index):
            if ix is not None:
                t = t.index_select(d, ix.to(t.device))
        if tuple(t.shape) != tuple(p.shape):
            kept.append(name)
            continue
        if any(ix is not None for ix in index):
            selected.append(name)
        p.copy_(t.to(device=p.device, dtype=p.dtype))
    return {"selected": selected, "random": kept}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _from_config(model_class: type, config: Any, **kwargs):
    """A model class's own `_from_config`, or an Auto class's `from_config`."""
    build = getattr(model_class, "_from_config", None) or model_class.from_config
    return build(config, **kwargs)


def _config_params(config: Any, model_class: type) -> int:
    with torch.device("meta"):  # the architecture without memory or initialisation
        return _count(_from_config(model_class, copy.deepcopy(config)))


def derive_model(teacher: Any, *, num_layers: Optional[int] = None, hidden_size: Optional[int] = None,
                 overrides: Optional[dict] = None, init: str = "teacher_layers", where: str = "student",
                 model_class: Optional[type] = None, dtype: Optional[torch.dtype] = None, verbose: bool = True):
    """A student derived from `teacher` (a transformers model, or only its config with init: random), of the
    teacher's class unless `model_class` (a transformers model class) is given. Prints the parameter counts and
    the mapping; the details are kept on the student as `_kdkit_derivation`."""
    teacher_model = teacher if isinstance(teacher, nn.Module) else None
    teacher_config = teacher.config if teacher_model is not None else teacher
    if init not in ("teacher_layers", "random"):
        raise ValueError(f"init must be teacher_layers or random, got {init!r}")
    if init == "teacher_layers" and teacher_model is None:
        raise ValueError("init: teacher_layers needs the teacher's weights (a model, not a config)")
    plan = derive_config(teacher_config, num_layers=num_layers, hidden_size=hidden_size, overrides=overrides,
                         init=init, where=where)
    if model_class is None and teacher_model is None:
        raise ValueError("give model_class to derive from a config")
    cls = model_class or type(teacher_model)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        student = _from_config(cls, plan.config, **kwargs)
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as err:
        raise UserError(f"{where}.derive_from: cannot build the derived {plan.model_type} model: "
                        f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from None
    filled = copy_teacher_weights(student, teacher_model, plan) if init == "teacher_layers" else None
    n_t = _count(teacher_model) if teacher_model is not None and not _packed(teacher_model) \
        else _config_params(teacher_config, cls)
    n_s = _count(student)
    student._kdkit_derivation = {"mapping": plan.mapping, "init": init, "dims": plan.dims, "teacher_params": n_t,
                                 "student_params": n_s, **(filled or {})}
    if verbose:
        print(describe(plan, n_t, n_s, filled, where), flush=True)
    return student


def _packed(model: nn.Module) -> bool:
    """Quantized weights (bitsandbytes) count packed elements, not parameters."""
    return getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None) is not None


def describe(plan: Derivation, n_t: int, n_s: int, filled: Optional[dict], where: str = "student") -> str:
    """The printed summary: the shape change, both parameter counts and what was copied."""
    (h_t, h_s), l_s = plan.dims["hidden"], len(plan.mapping)
    width = f"width {h_t} -> {h_s}" if h_t != h_s else f"width {h_t}"
    line = (f"{where}: derived from the teacher ({plan.model_type}, {plan.teacher_layers} -> {l_s} layers, {width}): "
            f"{_human(n_t)} -> {_human(n_s)} parameters; ")
    if filled is None:
        return line + "random initialisation"
    line += f"layers {','.join(map(str, plan.mapping))} copied with the embeddings, final norm and head"
    if filled["selected"]:
        changes = [f"{k.replace('_', ' ')} {t} -> {s}" for k, (t, s) in plan.dims.items()
                   if t != s and not (k == "kv_heads" and (t, s) == plan.dims["heads"])]
        line += (f"\n{where}: weight selection (Xu et al. 2023): {len(filled['selected'])} tensors narrowed to evenly "
                 f"spaced rows/columns of the teacher's ({', '.join(changes)})")
    if filled["random"]:
        shown = ", ".join(filled["random"][:6]) + (", ..." if len(filled["random"]) > 6 else "")
        line += (f"\nnote: {where}: {len(filled['random'])} tensor(s) the teacher cannot fill keep their random "
                 f"initialisation: {shown}")
    return line


def derive_from_spec(spec: Any, teacher: Any, *, where: str = "student", model_class: Optional[type] = None,
                     dtype: Optional[torch.dtype] = None):
    """`derive_model` with a ModelConfig's num_layers, hidden_size, overrides and init."""
    return derive_model(teacher, num_layers=spec.num_layers, hidden_size=spec.hidden_size, overrides=spec.overrides,
                        init=spec.init, where=where, model_class=model_class, dtype=dtype)
