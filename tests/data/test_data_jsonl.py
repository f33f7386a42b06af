"""JSON Lines: the strict reader (every problem names file:line) and the jsonl image-manifest source."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import kdkit.data.datasets as dsmod
from kdkit.config.schema import DataConfig
from kdkit.data import build_image_data
from kdkit.data.datasets import FileImageDataset
from kdkit.data.jsonl import read_jsonl
from kdkit.errors import DataError

COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}


def write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    return path


# ---- read_jsonl ---------------------------------------------------------------------------------------------


def test_records_with_their_line_numbers(tmp_path):
    path = write(tmp_path, '\ufeff{"text": "héllo"}\n\n   \n{"text": "b", "n": 2}\r\n{"text":"c"}'.encode())
    assert list(read_jsonl(path, required=("text",), nonempty=("text",))) == [
        (1, {"text": "héllo"}), (4, {"text": "b", "n": 2}), (5, {"text": "c"})]


@pytest.mark.parametrize("content,kw,message", [
    (b'{"text": "a"}\n{"text": "caf\xe9"}\n', {}, r"x\.jsonl:2: not valid UTF-8 \(byte 0xe9 at offset 13\)"),
    (b'{"text": "a"}\n\n{"text": "a",}\n', {}, r"x\.jsonl:3: not valid JSON: Expecting property name .*\(column 14\)"),
    (b'"just a string"\n', {}, r"x\.jsonl:1: expected a JSON object, got a string"),
    (b'{"text": "a"}\nnull\n', {}, r"x\.jsonl:2: expected a JSON object, got null"),
    (b'{"text": "a"}\n{"label": 1}\n', {"required": ("text",)}, r"x\.jsonl:2: missing field 'text'"),
    (b'{"text": "a"}\n{"text": " \\t\\n "}\n', {"nonempty": ("text",)}, r"x\.jsonl:2: field 'text' is empty"),
    (b'{"text": ""}\n', {"nonempty": ("text",)}, r"x\.jsonl:1: field 'text' is empty"),
    (b'{"label": 1}\n', {"nonempty": ("text",)}, r"x\.jsonl:1: missing field 'text'"),  # nonempty implies required
    (b"", {}, r"x\.jsonl: no records"),
    (b"\n  \n\n", {}, r"x\.jsonl: no records"),
], ids=["non-utf8", "bad-json", "string", "null", "missing", "blank-text", "empty-text", "nonempty-missing",
        "empty-file", "blank-file"])
def test_each_problem_names_file_and_line(tmp_path, content, kw, message):
    with pytest.raises(DataError, match=message):
        list(read_jsonl(write(tmp_path, content), **kw))


def test_a_nonempty_field_of_another_type_is_the_callers_to_check(tmp_path):
    assert list(read_jsonl(write(tmp_path, b'{"text": 0}\n'), nonempty=("text",))) == [(1, {"text": 0})]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"cannot read .*nope\.jsonl"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


# ---- data.source: jsonl -------------------------------------------------------------------------------------


def make_manifest(root: Path, labels: list, name: str = "data.jsonl", **fields) -> Path:
    """One solid-colour PNG per label under root/img/ and a manifest naming them relative to root."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, label in enumerate(labels):
        colour = COLOURS[label] if isinstance(label, str) else COLOURS[sorted(COLOURS)[label]]
        Image.new("RGB", (5 + i % 3, 6), colour).save(root / "img" / f"{i}.png")
        lines.append(json.dumps({fields.get("image", "image"): f"img/{i}.png", fields.get("label", "label"): label}))
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def cfg(path, **kw):
    return DataConfig(source="jsonl", path=str(path), image_size=(4, 4), **kw)


def test_class_names_are_the_sorted_label_names(tmp_path):
    labels = ["emu", "cat", "dog", "cat"] * 3
    data = build_image_data(cfg(make_manifest(tmp_path, labels)), seed=0)
    assert data.class_names == ["cat", "dog", "emu"] and data.num_classes == 3
    assert (len(data.train), len(data.val), len(data.test)) == (9, 1, 2)  # test 0.2 of 12, val 0.1 of the rest
    assert data.channels == 3 and data.image_size == (4, 4)
    for ds in (data.train, data.val, data.test):
        for image, label in (ds[i] for i in range(len(ds))):
            assert image.shape == (3, 4, 4) and image.dtype == torch.uint8
            assert image[:, 0, 0].tolist() == list(COLOURS[data.class_names[label]])  # label follows the image


def test_integer_labels_are_class_ids(tmp_path):
    data = build_image_data(cfg(make_manifest(tmp_path, [0, 2, 0, 2, 2, 0]), channels=1), seed=0)
    assert data.class_names == ["0", "1", "2"]  # 0..max: class 1 has no image, it still is a class
    image, label = data.test[0]
    assert image.shape == (1, 4, 4) and label in (0, 2)


def test_paths_are_relative_to_the_manifest_or_absolute(tmp_path, monkeypatch):
    path = make_manifest(tmp_path / "set", ["cat", "dog"] * 3)
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    record["image"] = str(tmp_path / "set" / record["image"])
    path.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    monkeypatch.chdir(tmp_path)  # neither the manifest's folder nor where the images are
    data = build_image_data(cfg(path), seed=0)
    assert len(data.train) + len(data.val) + len(data.test) == 6


def test_other_field_names(tmp_path):
    path = make_manifest(tmp_path, ["cat", "dog"] * 3, image="file", label="class")
    data = build_image_data(cfg(path, image_column="file", label_column="class"), seed=0)
    assert data.class_names == ["cat", "dog"]
    with pytest.raises(DataError, match=r"data\.jsonl:1: missing field 'image'"):
        build_image_data(cfg(path), seed=0)


def test_fingerprint_survives_a_move_not_a_relabel(tmp_path):
    path = make_manifest(tmp_path / "a", ["cat", "dog", "emu"] * 2)
    first = build_image_data(cfg(path), seed=0).fingerprint
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert build_image_data(cfg(tmp_path / "b" / "data.jsonl"), seed=0).fingerprint == first
    path.write_text(path.read_text().replace('"emu"', '"cat"', 1))
    assert build_image_data(cfg(path), seed=0).fingerprint != first


def test_large_manifests_decode_lazily_and_agree(tmp_path, monkeypatch):
    path = make_manifest(tmp_path, ["cat", "dog", "emu"] * 3)
    eager = build_image_data(cfg(path), seed=3)
    monkeypatch.setattr(dsmod, "EAGER_MAX_ITEMS", 0)
    lazy = build_image_data(cfg(path), seed=3)
    assert isinstance(lazy.train.base, FileImageDataset)
    assert lazy.fingerprint == eager.fingerprint
    for i in range(len(eager.train)):
        assert torch.equal(lazy.train[i][0], eager.train[i][0]) and lazy.train[i][1] == eager.train[i][1]
