"""Image folders: one sub-directory per class, either under train/ (val/, test/ optional) or directly in the root.

Small folders (see `datasets.EAGER_MAX_ITEMS`) are decoded into memory when built, so every file is checked up
front; larger ones decode per item, where a bad file raises DataError naming it when the loader reaches it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kdkit.data.datasets import SourceData, file_datasets
from kdkit.errors import ConfigError, DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}


def _class_dirs(folder: Path) -> list[str]:
    """Sorted names of the visible sub-directories of folder."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _images_in(class_dir: Path) -> list[Path]:
    """Image files under class_dir (recursively, hidden entries skipped), in a stable sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames)
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return found


def _scan_split(folder: Path, classes: list[str], *, defines_classes: bool) -> tuple[list[Path], list[int]]:
    """Files and labels of one split folder; classes must already be known unless this folder defines them."""
    names = _class_dirs(folder)
    if not names:
        raise DataError(f"{folder} has no class sub-directories (expected one folder of images per class)")
    unknown = sorted(set(names) - set(classes))
    if unknown and not defines_classes:
        raise DataError(f"{folder} has class folder(s) {unknown} that are not in the training classes {classes}")
    paths, labels = [], []
    for name in names:
        files = _images_in(folder / name)
        if not files:
            raise DataError(f"class folder {folder / name} contains no images "
                            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        paths += files
        labels += [classes.index(name)] * len(files)
    return paths, labels


def load_image_folder(path: str | None, channels: int | None, image_size: tuple[int, int] | None) -> SourceData:
    """The splits of an image folder; channels default to 3 (RGB), image_size is required."""
    problems = []
    if not path:
        problems.append(("data.path", "image_folder needs the root directory of the images"))
    elif not Path(path).expanduser().is_dir():
        problems.append(("data.path", f"{path} is not a directory"))
    if image_size is None:
        problems.append(("data.image_size", "image_folder needs the size [H, W] images are resized to"))
    if problems:
        raise ConfigError(problems)
    root = Path(path).expanduser()
    channels = channels or 3
    size = (int(image_size[0]), int(image_size[1]))

    # train/ decides the layout: a root holding a class literally named "train" is read as a split layout
    layout = "splits" if (root / "train").is_dir() else "flat"
    train_dir = root / "train" if layout == "splits" else root
    classes = _class_dirs(train_dir) if train_dir.is_dir() else []
    if not classes:
        raise DataError(f"{train_dir} has no class sub-directories (expected one folder of images per class)")
    scanned = {"train": _scan_split(train_dir, classes, defines_classes=True)}
    if layout == "splits":
        for split in ("val", "test"):
            if (root / split).is_dir():
                scanned[split] = _scan_split(root / split, classes, defines_classes=False)

    datasets = file_datasets(scanned, channels, size)

    # relative names, sizes and labels define the data (the root may move without changing it)
    h = hashlib.sha256()
    for split, (paths, labels) in sorted(scanned.items()):
        for p, y in zip(paths, labels):
            h.update(f"{split}\t{p.relative_to(root).as_posix()}\t{p.stat().st_size}\t{y}\n".encode())
    return SourceData(
        train=datasets["train"], val=datasets.get("val"), test=datasets.get("test"), class_names=classes,
        channels=channels, image_size=size,
        identity={"layout": layout, "files": h.hexdigest(), "counts": {s: len(p) for s, (p, _) in scanned.items()}})
