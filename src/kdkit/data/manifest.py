"""data.source=jsonl: an image-classification manifest, one JSON object per line, e.g.

    {"image": "cats/001.png", "label": "cat"}

`image` is relative to the manifest's directory (or absolute). Labels are either all class names (the classes
are their sorted unique names) or all integer class ids >= 0 (the classes are 0..max). Every manifest problem
names `manifest:line`; an image that does not decode names its file (checked up front for small manifests, when
the loader reaches it for large ones: see `datasets.file_datasets`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from kdkit.data.datasets import SourceData, file_datasets
from kdkit.data.jsonl import read_jsonl
from kdkit.errors import ConfigError, DataError


def _label(value: object, where: str) -> str | int:
    """A class name or class id as written on one line; anything else is a DataError naming the line."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{where}: label {value!r} is neither a class name (string) nor a class id (integer)")
    if isinstance(value, int) and value < 0:
        raise DataError(f"{where}: label {value} is out of range: class ids count from 0")
    return value


def _image_file(value: object, base: Path, where: str) -> tuple[Path, int]:
    """The image file a line names and its size in bytes; DataError naming the line when it is not a file."""
    if not isinstance(value, str):
        raise DataError(f"{where}: image {value!r} is not a path string")
    file = base / value  # an absolute path stays absolute
    try:
        if file.is_file():
            return file, file.stat().st_size
    except OSError:  # a name too long for the file system, say
        pass
    raise DataError(f"{where}: image file not found: {file}")


def load_jsonl_images(path: str | None, channels: int | None, image_size: tuple[int, int] | None,
                      image_field: str = "image", label_field: str = "label") -> SourceData:
    """All the manifest's images as the training pool (validation and test are carved from it)."""
    problems = []
    if not path:
        problems.append(("data.path", "source jsonl needs the .jsonl manifest"))
    if image_size is None:
        problems.append(("data.image_size", "source jsonl needs the size [H, W] images are resized to"))
    if problems:
        raise ConfigError(problems)
    manifest = Path(path)
    files: list[Path] = []
    written: list[tuple[int, str | int]] = []  # (line, label as written)
    h = hashlib.sha256()
    for number, record in read_jsonl(manifest, nonempty=(image_field, label_field)):
        where = f"{manifest}:{number}"
        file, nbytes = _image_file(record[image_field], manifest.parent, where)
        label = _label(record[label_field], where)
        if written and isinstance(label, str) != isinstance(written[0][1], str):
            first_line, first = written[0]
            raise DataError(f"{where}: label {label!r} mixes class names and class ids (line {first_line} has "
                            f"{first!r}); use one kind throughout")
        files.append(file)
        written.append((number, label))
        # the image as written, its size and label define the data (the manifest's folder may move)
        h.update(f"{record[image_field]}\t{nbytes}\t{label!r}\n".encode())

    raw = [label for _, label in written]
    if isinstance(raw[0], str):
        class_names = sorted(set(raw))
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[y] for y in raw]
    else:
        class_names = [str(i) for i in range(max(raw) + 1)]
        labels = [int(y) for y in raw]
    channels = channels or 3
    size = (int(image_size[0]), int(image_size[1]))
    pool = file_datasets({"train": (files, labels)}, channels, size)["train"]
    return SourceData(train=pool, test=None, val=None, class_names=class_names, channels=channels, image_size=size,
                      identity={"manifest": h.hexdigest(), "n": len(files)})
