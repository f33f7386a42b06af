"""Build teachers and students from a `ModelConfig`, and save/load them in the run directory's `student/` layout.

Four sources, one result (an `ImageClassifier`):
  pretrained  a Hugging Face image classifier by hub ID or local save_pretrained directory
  hf_config   a Hugging Face config ({model_type: ...} or {base: ID/dir, ...overrides}); random weights
  factory     any nn.Module from 'package.module:function' or 'path/file.py:function' with kwargs
  run         a previous kdkit run directory (or its student/ directory): a model kdkit trained, reused as is
and a student `derive_from: teacher` (kdkit.models.derive): the teacher's Hugging Face ViT with fewer layers or a
narrower width, initialised from the teacher's weights, with the teacher's preprocessing.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as load_safetensors_model, save_model as save_safetensors_model
from torch import nn

from kdkit.config.schema import ModelConfig
from kdkit.errors import UserError
from kdkit.models.classifier import ImageClassifier

KDKIT_JSON = "kdkit.json"


def _pair(v: Any) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def resolve_factory(spec: str, where: str):
    """'pkg.mod:fn' or 'path/to/file.py:fn' -> the callable; UserError naming `where` when it cannot be found."""
    if ":" not in spec:
        raise UserError(f"{where}: expected 'package.module:function' or 'path/file.py:function', got {spec!r}")
    mod_name, _, fn_name = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser()
            if not path.is_file():
                raise UserError(f"{where}: file not found: {path}")
            name = f"kdkit_user_{path.stem}_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except UserError:
        raise
    except Exception as err:  # an import error in the user's module: say where, keep it short
        raise UserError(f"{where}: cannot import {mod_name!r}: {type(err).__name__}: {err}") from None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise UserError(f"{where}: {mod_name!r} has no callable {fn_name!r}")
    return fn


def _call_factory(fn, kwargs: dict, num_classes: int, channels: int, where: str) -> nn.Module:
    kwargs = dict(kwargs)
    params = inspect.signature(fn).parameters
    # Fill the data-dependent arguments a factory declares but the config left out.
    for name, value in (("num_classes", num_classes), ("in_channels", channels)):
        if name in params and name not in kwargs:
            kwargs[name] = value
    try:
        net = fn(**kwargs)
    except (TypeError, ValueError) as err:  # bad kwargs: the user's to fix
        raise UserError(f"{where}: {fn.__name__}(**kwargs) failed: {err}") from None
    if not isinstance(net, nn.Module):
        raise UserError(f"{where}: the factory returned {type(net).__name__}, not an nn.Module")
    return net


def _hf_preprocessing(path: str, revision: str | None, trust: bool) -> dict:
    """mean/std/size from a Hugging Face image processor, when the model has one."""
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust)
    except Exception:
        return {}
    out: dict[str, Any] = {}
    if getattr(proc, "image_mean", None) is not None:
        out["mean"] = list(proc.image_mean)
        out["std"] = list(proc.image_std)
    size = getattr(proc, "size", None)
    if size is not None:
        h = getattr(size, "height", None) or (size.get("height") if isinstance(size, dict) else None)
        w = getattr(size, "width", None) or (size.get("width") if isinstance(size, dict) else None)
        short = getattr(size, "shortest_edge", None) or (size.get("shortest_edge") if isinstance(size, dict) else None)
        if h and w:
            out["image_size"] = (int(h), int(w))
        elif short:
            out["image_size"] = (int(short), int(short))
    return out


def _check_image_model_type(model_type: Any, where: str) -> None:
    """UserError naming `where` unless transformers has an image classifier of this model_type (with a hint)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    known = sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
    if model_type in known:
        return
    close = difflib.get_close_matches(str(model_type), known, n=3)
    hint = f"did you mean {' or '.join(close)}?" if close else f"image classifiers: {', '.join(known)}"
    raise UserError(f"{where}: transformers has no image classifier of model type {model_type!r}; {hint}")


def _hf_model(spec: ModelConfig, num_classes: int, channels: int, where: str, role: str) -> tuple[nn.Module, dict]:
    from transformers import AutoConfig, AutoModelForImageClassification

    if spec.pretrained is not None:
        try:
            cfg = AutoConfig.from_pretrained(spec.pretrained, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        except Exception as err:
            raise UserError(f"{where}.pretrained: cannot load {spec.pretrained!r}: {err}") from None
        kwargs: dict[str, Any] = {}
        if getattr(cfg, "num_labels", None) != num_classes:
            if role == "teacher":
                raise UserError(f"{where}.pretrained: the teacher predicts {cfg.num_labels} classes but the data has "
                                f"{num_classes}; fine-tune it on this data first (a run without a teacher)")
            kwargs = {"num_labels": num_classes, "ignore_mismatched_sizes": True}  # a fresh head for the student
        net = AutoModelForImageClassification.from_pretrained(
            spec.pretrained, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **kwargs)
        pre = _hf_preprocessing(spec.pretrained, spec.revision, spec.trust_remote_code)
        return net, pre
    overrides = dict(spec.hf_config)
    base = overrides.pop("base", None)
    overrides.setdefault("num_labels", num_classes)
    try:
        if base is not None:
            cfg = AutoConfig.from_pretrained(base, trust_remote_code=spec.trust_remote_code, **overrides)
            pre = _hf_preprocessing(base, None, spec.trust_remote_code)
        else:
            model_type = overrides.pop("model_type", None)
            if model_type is None:
                raise UserError(f"{where}.hf_config: give model_type (e.g. vit, resnet, mobilevit) or base")
            _check_image_model_type(model_type, f"{where}.hf_config.model_type")
            if "num_channels" not in overrides:
                overrides["num_channels"] = channels
            cfg = AutoConfig.for_model(model_type, **overrides)
            pre = {}
        net = AutoModelForImageClassification.from_config(cfg, trust_remote_code=spec.trust_remote_code)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{where}.hf_config: {type(err).__name__}: {err}") from None
    size = _pair(getattr(cfg, "image_size", None))
    if size is not None:
        pre.setdefault("image_size", size)
    return net, pre


def read_export(path: str | Path, where: str) -> tuple[Path, dict]:
    """(the exported model's directory, its kdkit.json) for a run directory or its student/ directory; UserError
    naming `where` when there is none or it is not JSON."""
    path = Path(path).expanduser()
    if (path / "student" / KDKIT_JSON).is_file():
        path = path / "student"
    meta_file = path / KDKIT_JSON
    if not meta_file.is_file():
        raise UserError(f"{where}: {path} is not a kdkit run or exported model (no {KDKIT_JSON})")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as err:
        raise UserError(f"{where}: {meta_file} is malformed ({err})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{where}: {meta_file} is malformed (not a JSON object)")
    return path, meta


def load_exported(path: str | Path, where: str) -> ImageClassifier:
    """Load what `save_model` wrote (a run directory or its student/ directory)."""
    path, meta = read_export(path, where)
    meta_file = path / KDKIT_JSON
    try:
        pre = dict(image_size=meta["image_size"], mean=meta["mean"], std=meta["std"], num_classes=meta["num_classes"])
        fmt = meta["format"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{where}: {meta_file} is malformed ({type(err).__name__}: {err})") from None
    if fmt == "hf":
        from transformers import AutoModelForImageClassification

        try:
            net = AutoModelForImageClassification.from_pretrained(path)
        except Exception as err:
            raise UserError(f"{where}: cannot load the model in {path}: {err}") from None
        return ImageClassifier(net, is_hf=True, spec={"format": "hf"}, **pre)
    fn = resolve_factory(meta["factory"], where)
    net = _call_factory(fn, meta.get("kwargs", {}), meta["num_classes"], len(meta["mean"]), where)
    try:
        load_safetensors_model(net, str(path / "model.safetensors"))
    except Exception as err:  # missing, corrupt or not fitting the factory's module
        raise UserError(f"{where}: {path / 'model.safetensors'} does not load into {meta['factory']}: "
                        f"{str(err).splitlines()[0][:300]}") from None
    return ImageClassifier(net, is_hf=False, spec={"format": "module", "factory": meta["factory"], "kwargs": meta.get("kwargs", {})}, **pre)


def _derived(spec: ModelConfig, teacher: ModelConfig | None, loaded: Any, num_classes: int, channels: int,
             data_size: tuple[int, int], where: str) -> tuple[nn.Module, dict]:
    """A student derived from the teacher (kdkit.models.derive), and the teacher's preprocessing. The loaded teacher
    (a FrozenTeacher) is used when there is one; else (a cached teacher) the teacher is built from its spec."""
    from kdkit.models.derive import SUPPORTED, derive_from_spec

    model = getattr(loaded, "model", None)
    if not isinstance(model, ImageClassifier):
        sources = ("pretrained", "hf_config", "factory", "run")
        if teacher is None or not any(getattr(teacher, k) is not None for k in sources):
            raise UserError(f"{where}.derive_from: needs the teacher's model: with teacher.cache, also give the "
                            "source the cache was made from (teacher.pretrained, hf_config or run)")
        model = build_model(teacher.model_copy(update={"cache": None}), num_classes=num_classes, channels=channels,
                            data_size=data_size, role="teacher")
    if not model.is_hf:
        raise UserError(f"{where}.derive_from: the teacher ({model.spec.get('factory', 'a custom module')}) is not a "
                        f"Hugging Face model; a student is derived from {SUPPORTED}")
    net = derive_from_spec(spec, model.net, where=where, dtype=torch.float32)
    return net, {"mean": list(model.mean), "std": list(model.std), "image_size": tuple(model.image_size)}


def build_model(spec: ModelConfig, *, num_classes: int, channels: int, data_size: tuple[int, int],
                role: str = "student", teacher: ModelConfig | None = None, loaded_teacher: Any = None) -> ImageClassifier:
    """A teacher or student as an ImageClassifier; errors name `<role>.<field>`. A student with `derive_from` is
    made from `teacher` (its spec) and `loaded_teacher` (the FrozenTeacher, when loaded)."""
    where = role
    if spec.run is not None:
        model = load_exported(spec.run, f"{where}.run")
        if model.num_classes != num_classes:
            raise UserError(f"{where}.run: the model predicts {model.num_classes} classes but the data has {num_classes}")
        return model
    if spec.factory is not None:
        fn = resolve_factory(spec.factory, f"{where}.factory")
        net = _call_factory(fn, spec.kwargs, num_classes, channels, f"{where}.factory")
        model_channels = int(spec.kwargs.get("in_channels", channels))
        pre = {}
        meta = {"format": "module", "factory": spec.factory, "kwargs": spec.kwargs}
        is_hf = False
    else:
        net, pre = (_derived(spec, teacher, loaded_teacher, num_classes, channels, data_size, where)
                    if spec.derive_from is not None else _hf_model(spec, num_classes, channels, where, role))
        model_channels = int(getattr(net.config, "num_channels", channels))
        meta = {"format": "hf"}
        is_hf = True
    if spec.gradient_checkpointing:
        if is_hf and getattr(net, "supports_gradient_checkpointing", False):
            net.gradient_checkpointing_enable()
        else:
            print(f"note: {where}.gradient_checkpointing: {type(net).__name__} does not support it; ignored")
    mean = spec.mean or pre.get("mean") or [0.5] * model_channels
    std = spec.std or pre.get("std") or [0.5] * model_channels
    if len(mean) != len(std):
        raise UserError(f"{where}.mean/{where}.std: lengths differ ({len(mean)} vs {len(std)})")
    size = _pair(spec.image_size) or pre.get("image_size") or tuple(data_size)
    model = ImageClassifier(net, image_size=size, mean=mean, std=std, num_classes=num_classes, is_hf=is_hf, spec=meta)
    check_output(model, channels, data_size, where)
    return model


def check_output(model: ImageClassifier, channels: int, data_size: tuple[int, int], where: str) -> None:
    """One forward on zeros before any training: a model that does not map the data to (B, num_classes) is the
    config's problem, said now rather than as a shape error after the baseline has trained."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # no randomness is drawn: exact resume and seeding are untouched
            out = model(torch.zeros(1, channels, *data_size))
    except Exception as err:
        raise UserError(f"{where}: a forward pass on a {channels}x{data_size[0]}x{data_size[1]} batch failed: "
                        f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from None
    finally:
        model.train(was_training)
    if tuple(out.shape) != (1, model.num_classes):
        raise UserError(f"{where}: the model outputs shape {tuple(out.shape)} for one sample, but the data has "
                        f"{model.num_classes} classes (check num_classes in its kwargs or config)")


def save_model(model: ImageClassifier, out_dir: str | Path, *, class_names: list[str] | None = None) -> Path:
    """Write the model so it loads without kdkit where the family allows (HF: save_pretrained + image processor)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {**model.preprocessing(), **model.spec, "class_names": class_names}
    net = model.net
    if model.is_hf:
        if class_names:
            net.config.id2label = {i: n for i, n in enumerate(class_names)}
            net.config.label2id = {n: i for i, n in enumerate(class_names)}
        net.save_pretrained(out_dir)
        _save_image_processor(model, out_dir)
    else:
        save_safetensors_model(net, str(out_dir / "model.safetensors"))  # tied weights stored once
    (out_dir / KDKIT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def _save_image_processor(model: ImageClassifier, out_dir: Path) -> None:
    """A plain resize + rescale + normalise processor, so `AutoImageProcessor.from_pretrained(student/)` works."""
    try:
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil as Processor
    except ImportError:  # older layouts
        from transformers import ViTImageProcessor as Processor
    h, w = model.image_size
    Processor(do_resize=True, size={"height": h, "width": w}, image_mean=model.mean, image_std=model.std).save_pretrained(out_dir)


def fingerprint_model(model: nn.Module) -> str:
    """A short content hash of a model's weights (teacher identity in checkpoints and metrics)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()[:16]
