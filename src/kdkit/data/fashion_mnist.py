"""Fashion-MNIST from IDX files: found locally (data.path, the Debian package, the user cache) or downloaded."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import sys
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from kdkit.data.datasets import SourceData, TensorImageDataset
from kdkit.data.images import convert_images
from kdkit.cache import cache_dir as kdkit_cache_dir
from kdkit.errors import ConfigError, DataError

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# role -> (file name without .gz, IDX rank, sha256 of the decompressed bytes)
FILES = {
    "train_images": ("train-images-idx3-ubyte", 3, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train_labels": ("train-labels-idx1-ubyte", 1, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "test_images": ("t10k-images-idx3-ubyte", 3, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "test_labels": ("t10k-labels-idx1-ubyte", 1, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
_IDX_UBYTE = 0x08


def cache_dir() -> Path:
    """<kdkit cache>/fashion-mnist."""
    return kdkit_cache_dir() / "fashion-mnist"


def _scan(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """The four files in `directory` (plain preferred over .gz) and the names of those missing."""
    found, missing = {}, []
    for role, (name, _, _) in FILES.items():
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            missing.append(name)
    return found, missing


def read_idx(path: Path, ndim: int) -> tuple[np.ndarray, str]:
    """An unsigned-byte IDX file (plain or gzip) -> (array of rank ndim, sha256 of the decompressed bytes)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if raw[:2] == b"\x1f\x8b":  # sniff gzip rather than trust the suffix
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != _IDX_UBYTE:
        raise DataError(f"{path}: IDX element type 0x{raw[2]:02x} is not supported (only unsigned bytes, 0x08)")
    if raw[3] != ndim:
        raise DataError(f"{path}: IDX file of rank {raw[3]}, expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: dims {list(dims)} need {expected} bytes, the file has {len(raw)}")
    digest = hashlib.sha256(raw).hexdigest()
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims), digest


def _download(dest: Path) -> None:
    """Fetch the missing .gz files into dest, each checked against its sha256 before it gets its final name."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    dest.mkdir(parents=True, exist_ok=True)
    _, missing = _scan(dest)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    print(f"kdkit: downloading Fashion-MNIST from {MIRROR} into {dest}", file=sys.stderr)
    with Progress(*columns, transient=True) as progress:
        for role, (name, _, sha) in FILES.items():
            if name not in missing:
                continue
            final = dest / f"{name}.gz"
            tmp = dest / f"{name}.gz.part{os.getpid()}"  # a killed download never looks like a finished file
            try:
                with _urlopen(MIRROR + final.name) as response, open(tmp, "wb") as out:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    task = progress.add_task(final.name, total=total)
                    while chunk := response.read(1 << 16):
                        out.write(chunk)
                        progress.advance(task, len(chunk))
                try:
                    got = hashlib.sha256(gzip.decompress(tmp.read_bytes())).hexdigest()
                except (OSError, EOFError, zlib.error) as e:
                    raise DataError(f"downloaded {MIRROR + final.name} is not valid gzip ({e})") from e
                if got != sha:
                    raise DataError(f"checksum mismatch for {MIRROR + final.name}: sha256 of the decompressed data "
                                    f"is {got}, expected {sha}; nothing was kept")
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)


def _urlopen(url: str):
    """Indirection so tests can serve files without a network."""
    return urllib.request.urlopen(url, timeout=60)


def locate(path: str | None, download: bool) -> dict[str, Path]:
    """The four IDX files: data.path only if given; else the Debian package, the cache, then a download."""
    if path:
        d = Path(path).expanduser()
        if not d.is_dir():
            raise ConfigError([("data.path", f"{d} is not a directory (expected the four Fashion-MNIST IDX files)")])
        found, missing = _scan(d)
        if missing:
            raise ConfigError([("data.path", f"{d} lacks the Fashion-MNIST file(s) {', '.join(missing)} "
                                             "(each plain or .gz)")])
        return found
    for d in (SYSTEM_DIR, cache_dir()):
        found, missing = _scan(d)
        if not missing:
            return found
    cause = "downloading is off (data.download: false)"
    if download:
        try:
            _download(cache_dir())
            found, missing = _scan(cache_dir())
            if not missing:
                return found
            cause = f"after downloading, still missing {', '.join(missing)}"
        except OSError as e:  # network and file-system failures; checksum mismatches propagate as DataError
            cause = f"download failed: {e}"
    raise DataError(
        f"Fashion-MNIST not found ({cause}). Either `apt-get install dataset-fashion-mnist`, or put "
        f"{', '.join(n + '[.gz]' for n, _, _ in FILES.values())} in {cache_dir()}, or set data.path.")


def _check_labels(labels: np.ndarray, path: Path) -> None:
    bad = np.flatnonzero(labels >= len(CLASS_NAMES))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}: label {int(labels[i])} at sample {i} is out of range 0..{len(CLASS_NAMES) - 1}")


def load_fashion_mnist(path: str | None, download: bool, channels: int | None,
                       image_size: tuple[int, int] | None) -> SourceData:
    """Train 60000 / test 10000 images, (1, 28, 28) natively; converted to channels / image_size when given."""
    files = locate(path, download)
    # decompressing and hashing release the GIL: the four files are read in parallel
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(files, pool.map(lambda r: read_idx(files[r], FILES[r][1]), files)))
    arrays = {role: arr for role, (arr, _) in results.items()}
    splits = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{files[f'{split}_images']} has {images.shape[0]} images but "
                            f"{files[f'{split}_labels']} has {labels.shape[0]} labels")
        _check_labels(labels, files[f"{split}_labels"])
        x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, H, W); copy: frombuffer arrays are read-only
        x = convert_images(x, channels, image_size)
        splits[split] = TensorImageDataset(x, torch.from_numpy(labels.astype(np.int64)))
    x = splits["train"].images
    return SourceData(
        train=splits["train"], test=splits["test"], val=None, class_names=list(CLASS_NAMES),
        channels=x.shape[1], image_size=(x.shape[2], x.shape[3]),
        # content hashes, not paths: the same files in another directory (or gzipped) are the same data
        identity={"sha256": {FILES[r][0]: digest for r, (_, digest) in sorted(results.items())}})
