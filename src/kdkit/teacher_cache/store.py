"""The on-disk teacher cache: safetensors shards of consecutive training samples plus manifest.json.

Layout of a cache directory:
  manifest.json          {"version", "kind", "key": {"teacher", "teacher_spec", "tokenizer", "data", "settings"},
                          "num_samples", "shard_samples", "complete", "shards": [{"file", "start", "end", "sha256",
                          "bytes", "units"}], "bytes_per_unit", "unit"}
  shard-00000.safetensors  samples [0, shard_samples) of the training split, in dataset order
  shard-00000.json         written after its shard (atomically): the shard is finished; a resumed `kdkit cache`
                           keeps it when its sha256 still matches
The key says what the cache was made from. A run that trains from the cache compares the parts it can check
(data, tokenizer, settings, and the teacher's spec when the config names one) and refuses a mismatch, naming the part.
What a shard holds is up to the task (kdkit.teacher_cache.lm for lm and vlm, kdkit.teacher_cache.classification).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from kdkit.errors import DataError, UserError
from kdkit.train.checkpoint import sha256_file

MANIFEST = "manifest.json"
VERSION = 1
KEY_PARTS = ("tokenizer", "data", "settings", "teacher_spec", "teacher")  # the data fingerprint includes the tokenizer


def shard_file(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def describe_difference(found: dict, expected: dict, where: str) -> Optional[str]:
    """The first key part (or settings entry) that differs, said plainly; None when all that `expected` names agree."""
    for part in KEY_PARTS:
        if part not in expected or expected[part] is None:
            continue
        if part == "settings":
            for k, v in expected["settings"].items():
                if found.get("settings", {}).get(k) != v:
                    return (f"{where} was made with {k} = {found.get('settings', {}).get(k)!r}; this run needs "
                            f"{v!r}")
        elif found.get(part) != expected[part]:
            what = {"data": "other data (the training split's tokens or pixels, or its order, differ)",
                    "tokenizer": "another tokenizer (vlm: another processor: tokenizer, chat template or image "
                                 "processing)",
                    "teacher_spec": "another teacher (the config's teacher differs)",
                    "teacher": "another teacher (its weights differ)"}[part]
            return f"{where} was made from {what}"
    return None


class CacheWriter:
    """Writes shards for `kdkit cache`; finished shards of an interrupted run with the same key are kept."""

    def __init__(self, directory: str | Path, kind: str, key: dict, num_samples: int, shard_samples: int, *,
                 overwrite: bool = False):
        """Checks only (every process the same answer, nothing written); `start()` on one process then writes."""
        self.dir, self.kind, self.key = Path(directory), kind, key
        self.num_samples, self.shard_samples = int(num_samples), int(shard_samples)
        self.num_shards = max(1, -(-self.num_samples // self.shard_samples))
        manifest = self.dir / MANIFEST
        if manifest.is_file() and not overwrite:
            old = json.loads(manifest.read_text())
            diff = describe_difference(old.get("key", {}), key, str(self.dir))
            if diff is None and (old.get("shard_samples"), old.get("num_samples")) != (shard_samples, num_samples):
                diff = f"{self.dir} was made with other shard sizes"
            if diff:
                raise UserError(f"{diff}; remove it, choose another --output, or pass --overwrite")
        elif self.dir.exists() and any(self.dir.iterdir()) and not overwrite:
            raise UserError(f"{self.dir} exists and is not a kdkit teacher cache; choose another --output")
        self.overwrite = overwrite

    def start(self) -> None:
        """An unfinished manifest (and, with overwrite, no old shards): one process, before any shard is written."""
        if self.overwrite and self.dir.exists():
            for f in self.dir.glob("shard-*"):
                f.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.dir / MANIFEST, json.dumps(self._manifest([], False), indent=1).encode())

    def _manifest(self, shards: list, complete: bool, **extra: Any) -> dict:
        return {"version": VERSION, "kind": self.kind, "key": self.key, "num_samples": self.num_samples,
                "shard_samples": self.shard_samples, "complete": complete, "shards": shards, **extra}

    def bounds(self, i: int) -> tuple[int, int]:
        return i * self.shard_samples, min(self.num_samples, (i + 1) * self.shard_samples)

    def finished(self, i: int) -> bool:
        """Shard i was written whole by an earlier run (its record exists and its bytes still match)."""
        record, path = self.dir / f"shard-{i:05d}.json", self.dir / shard_file(i)
        if not (record.is_file() and path.is_file()):
            return False
        try:
            return json.loads(record.read_text()).get("sha256") == sha256_file(path)
        except (OSError, ValueError):
            return False

    def write(self, i: int, tensors: dict[str, torch.Tensor], units: int) -> None:
        """Shard i (atomically), then its record: a kill between the two leaves a shard that is redone."""
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in tensors.items()})
        path = self.dir / shard_file(i)
        _write_atomic(path, data)
        start, end = self.bounds(i)
        record = {"file": path.name, "start": start, "end": end, "sha256": hashlib.sha256(data).hexdigest(),
                  "bytes": len(data), "units": int(units)}
        _write_atomic(self.dir / f"shard-{i:05d}.json", json.dumps(record).encode())

    def finish(self, unit: str) -> dict:
        """manifest.json with every shard: the cache is complete."""
        shards = [json.loads((self.dir / f"shard-{i:05d}.json").read_text()) for i in range(self.num_shards)]
        units = sum(s["units"] for s in shards)
        payload = sum(s["bytes"] for s in shards)
        manifest = self._manifest(shards, True, unit=unit, units=units,
                                  bytes_per_unit=round(payload / max(units, 1), 2))
        _write_atomic(self.dir / MANIFEST, json.dumps(manifest, indent=1).encode())
        return manifest


class CacheReader:
    """A complete cache, read shard by shard (each checked against its sha256 when first loaded)."""

    def __init__(self, directory: str | Path, where: str = "teacher.cache"):
        self.dir, self.where = Path(directory), where
        path = self.dir / MANIFEST
        if not path.is_file():
            raise UserError(f"{where}: {self.dir} is not a kdkit teacher cache (no {MANIFEST}); make one with "
                            "`kdkit cache CONFIG --output DIR`")
        try:
            self.manifest = json.loads(path.read_text())
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if self.manifest.get("version") != VERSION:
            raise UserError(f"{where}: {self.dir} has cache format {self.manifest.get('version')}, this kdkit reads "
                            f"{VERSION}; make it again with `kdkit cache`")
        if not self.manifest.get("complete"):
            raise UserError(f"{where}: {self.dir} is unfinished; run `kdkit cache` again with the same config to "
                            "complete it")
        self.kind, self.key = self.manifest["kind"], self.manifest["key"]
        self.shard_samples, self.num_samples = self.manifest["shard_samples"], self.manifest["num_samples"]
        self._open: dict[int, Shard] = {}

    def check(self, kind: str, expected: dict) -> None:
        """UserError naming the part of the key that differs from what this run needs."""
        if self.kind != kind:
            raise UserError(f"{self.where}: {self.dir} holds a {self.kind} cache; this run is {kind}")
        diff = describe_difference(self.key, expected, str(self.dir))
        if diff is None and expected.get("num_samples", self.num_samples) != self.num_samples:
            diff = f"{self.dir} has {self.num_samples} training samples; this run has {expected['num_samples']}"
        if diff:
            raise UserError(f"{self.where}: {diff}; make the cache again with `kdkit cache` and this config")

    def shard(self, i: int) -> "Shard":
        """Shard i, memory-mapped (rows are read when sliced); its bytes are checked against the manifest's sha256
        the first time this process opens it."""
        if i not in self._open:
            from safetensors import safe_open

            record = self.manifest["shards"][i]
            path = self.dir / record["file"]
            try:
                digest = sha256_file(path)
            except OSError as e:
                raise DataError(f"{path}: cannot read the cache shard ({e})") from None
            if digest != record["sha256"]:
                raise DataError(f"{path}: the cache shard is corrupt or truncated (its sha256 does not match "
                                f"{MANIFEST}); run `kdkit cache` again")
            self._open[i] = Shard(safe_open(str(path), framework="pt"))
        return self._open[i]

    def locate(self, index: int) -> tuple["Shard", int]:
        """(the shard holding training sample `index`, its position there)."""
        if not 0 <= index < self.num_samples:
            raise DataError(f"{self.dir}: sample {index} is not in the cache ({self.num_samples} samples)")
        i, j = divmod(index, self.shard_samples)
        return self.shard(i), j


class Shard:
    """One memory-mapped shard: `shard["name"]` is the whole tensor, `shard.rows("name", a, b)` reads rows [a, b)
    only; small tensors read whole are kept."""

    def __init__(self, handle):
        self.handle = handle
        self._whole: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._whole:
            self._whole[name] = self.handle.get_tensor(name)
        return self._whole[name]

    def rows(self, name: str, a: int, b: int) -> torch.Tensor:
        return self.handle.get_slice(name)[a:b]
