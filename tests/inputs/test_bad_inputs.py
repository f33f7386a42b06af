"""Bad input sweep: each broken config or data set, run through the real CLI, exits 2 with one error line naming
the problem (file, dotted path, line or sample) and a few detail lines at most; never a traceback.

Each case writes its broken files under tmp_path and returns the command line; `expect` must match stderr.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

import kdkit.data.datasets as dsmod
from kdkit.cli.main import main

from conftest import TINY, tiny_config, write_yaml

MAX_DETAIL_LINES = 6  # a config error lists its problems below the error line


@dataclass
class Case:
    name: str
    make: Callable[[Path], list[str]]  # writes the broken input under tmp_path, returns the argv
    expect: str                         # regex stderr must match: it names the file / dotted path / line / sample
    lazy: bool = False                  # decode images per item, so a bad file is met by the training loader


# ---- builders ----------------------------------------------------------------------------------------------


def config(tmp: Path, **extra) -> str:
    return str(write_yaml(tmp / "c.yaml", tiny_config(tmp / "run", **extra)))


def raw_config(tmp: Path, text: str | bytes) -> str:
    path = tmp / "c.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def png(path: Path, value: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 255 - value, 40)).save(path)
    return path.name


def folder(tmp: Path, broken: str | None = None) -> str:
    """Two classes of four PNGs; `broken` ('dog/2.png') is overwritten with bytes that are not an image."""
    root = tmp / "images"
    for c, name in enumerate(("cat", "dog")):
        for i in range(4):
            png(root / name / f"{i}.png", 200 * c + i)
    if broken:
        (root / broken).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 8)
    return str(root)


def image_data(**data) -> dict:
    """8 images: 2 test, 1 validation, 5 training samples, in batches of 2."""
    return {"data": {"val_fraction": 0.1, "limit_eval": 64, "image_size": [8, 8], **data}}


def folder_config(tmp: Path, broken: str | None = None, **data) -> list[str]:
    cfg = tiny_config(tmp / "run", train__batch_size=2)
    cfg.update(image_data(source="image_folder", path=folder(tmp, broken), **data))
    return ["train", str(write_yaml(tmp / "c.yaml", cfg))]


def manifest(tmp: Path, lines: list[str | bytes] | None = None, broken: int | None = None) -> Path:
    """images/0..7.png with labels a/b, one JSON line each; `lines` replaces (or, with None entries, keeps) them."""
    out = []
    for i in range(8):
        png(tmp / "images" / f"{i}.png", 30 * i)
        out.append(json.dumps({"image": f"images/{i}.png", "label": "ab"[i % 2]}).encode())
    if broken is not None:
        (tmp / "images" / f"{broken}.png").write_bytes(b"GIF89a truncated")
    for i, line in enumerate(lines or []):
        if line is not None:
            out[i] = line.encode() if isinstance(line, str) else line
    path = tmp / "data.jsonl"
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


def jsonl_config(tmp: Path, lines: list | None = None, broken: int | None = None, **data) -> list[str]:
    cfg = tiny_config(tmp / "run", train__batch_size=2)
    cfg.update(image_data(source="jsonl", path=str(manifest(tmp, lines, broken)), **data))
    return ["train", str(write_yaml(tmp / "c.yaml", cfg))]


def hf_config(tmp: Path, train_labels: list[int], test_labels: list[int]) -> list[str]:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    ints = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})

    def split(labels, feats):
        images = [Image.new("RGB", (8, 8), (60 * (y % 4), i, 9)) for i, y in enumerate(labels)]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=feats)

    # the test split keeps plain ints, so a label the train split's ClassLabel does not know can be stored
    datasets.DatasetDict(train=split(train_labels, features), test=split(test_labels, ints)).save_to_disk(str(tmp / "hf"))
    cfg = tiny_config(tmp / "run", train__batch_size=2)
    cfg.update(image_data(source="hf", path=str(tmp / "hf")))
    return ["train", str(write_yaml(tmp / "c.yaml", cfg))]


def override(*words: str, command: str = "train") -> Callable[[Path], list[str]]:
    return lambda tmp: [command, config(tmp), *words]


# ---- the corpus --------------------------------------------------------------------------------------------

CASES = [
    # config: types, keys, ranges
    Case("wrong type", lambda t: ["train", config(t, train__lr="fast")], r"train\.lr: Input should be a valid number"),
    Case("unknown key", lambda t: ["train", config(t, train__lrr=0.1)], r"train\.lrr: unknown key; did you mean 'lr'\?"),
    Case("unknown top-level key", override("tarin.lr=1"), r"tarin: unknown key; did you mean 'train'\?"),
    Case("negative rate", lambda t: ["train", config(t, train__lr=-1)], r"train\.lr: Input should be greater than 0"),
    Case("warmup ratio above 1", override("train.warmup_ratio=2"), r"train\.warmup_ratio: Input should be less than 1"),
    Case("nan rate", override("train.lr=.nan"), r"train\.lr: Input should be a finite number"),
    Case("negative loss weight", override("distill.terms=[{kind: kd, weight: -1}]"),
         r"distill\.terms\[0\]\.weight: Input should be greater than or equal to 0"),
    Case("unknown scheduler", override("train.scheduler=warp_speed"), r"train\.scheduler: unknown scheduler 'warp_speed'"),
    Case("unknown data source", override("data.source=mnist"), r"data\.source: Input should be 'fashion_mnist'"),
    Case("two model sources", override("student.pretrained=x"), r"student: .*give exactly one of pretrained"),
    # overrides
    Case("override without =", override("train.lr"), r"train\.lr: an override must look like dotted\.key=value"),
    Case("override with an empty key", override("=3"), r"'=3': an override must look like dotted\.key=value"),
    Case("override into a number", override("train.lr.x=1"), r"train\.lr: is float, cannot set train\.lr\.x"),
    Case("override on validate", override("train.batch_size=many", command="validate"),
         r"kdkit validate: error: .*c\.yaml:\n  train\.batch_size: Input should be a valid integer"),
    # config files
    Case("missing config file", lambda t: ["train", str(t / "missing.yaml")], r"config file not found: .*missing\.yaml"),
    Case("config is not YAML", lambda t: ["train", raw_config(t, "train:\n  betas: [0.9, 0.99\n")],
         r"in .*c\.yaml:\n  <root>: not valid YAML: line 3, column 1: expected ',' or '\]'"),
    Case("config is not UTF-8", lambda t: ["train", raw_config(t, b"train:\n  lr: \xff\xfe\n")],
         r"in .*c\.yaml:\n  <root>: not valid UTF-8 at line 2 \(byte 0xff\)"),
    Case("config is a list", lambda t: ["train", raw_config(t, "- 1\n- 2\n")],
         r"in .*c\.yaml:\n  <root>: the config must be a mapping, got list"),
    # files and models the config names
    Case("missing data directory", override("data.source=image_folder", "data.image_size=[8,8]", "data.path=nowhere/x"),
         r"data\.path: directory not found: nowhere/x"),
    Case("missing jsonl manifest", override("data.source=jsonl", "data.image_size=[8,8]", "data.path=nowhere.jsonl"),
         r"data\.path: file not found: nowhere\.jsonl"),
    Case("image folder without image_size", override("data.source=image_folder", "data.path=."),
         r"data\.image_size: source image_folder needs the size"),
    Case("missing factory file", override("student.factory=nowhere/models.py:mlp"),
         r"student\.factory: file not found: nowhere/models\.py"),
    Case("unknown factory function", override(f"student.factory={TINY}:no_such_fn"),
         r"student\.factory: '.*tiny_models\.py' has no callable 'no_such_fn'"),
    Case("unknown factory module", override("student.factory=no_such_module:mlp"),
         r"student\.factory: cannot import 'no_such_module'"),
    Case("factory returns no module", override(f"student.factory={TINY}:not_a_module", "student.kwargs={}"),
         r"student\.factory: the factory returned int, not an nn\.Module"),
    Case("unknown pretrained model", lambda t: ["train", config(t, teacher={"pretrained": str(t / "no_such_model")})],
         r"teacher\.pretrained: directory not found: .*no_such_model"),
    Case("unknown pretrained base", override("teacher={hf_config: {base: ./no_such_model}}", command="validate"),
         r"teacher\.hf_config\.base: directory not found: \./no_such_model"),
    Case("unknown hf model type", override("teacher={hf_config: {model_type: vitt}}"),
         r"teacher\.hf_config\.model_type: transformers has no image classifier of model type 'vitt'; did you mean vit"),
    Case("hf model type that is no image classifier", override("teacher={hf_config: {model_type: bert}}"),
         r"teacher\.hf_config\.model_type: transformers has no image classifier of model type 'bert'"),
    Case("teacher run not trained", lambda t: ["train", config(t, teacher={"run": str(t / "never_trained")})],
         r"teacher\.run: .*never_trained is not a finished kdkit run"),
    # image data
    Case("corrupt image in a folder", lambda t: folder_config(t, broken="dog/2.png"), r"cannot read image .*dog/2\.png"),
    Case("corrupt image in a folder, met in training", lambda t: folder_config(t, broken="dog/2.png"),
         r"cannot read image .*dog/2\.png", lazy=True),
    Case("corrupt image in a folder, met by a loader worker", lambda t: folder_config(t, broken="cat/1.png", num_workers=1),
         r"cannot read image .*cat/1\.png", lazy=True),
    Case("corrupt image in a manifest", lambda t: jsonl_config(t, broken=5), r"cannot read image .*images/5\.png"),
    Case("corrupt image in a manifest, met in training", lambda t: jsonl_config(t, broken=5),
         r"cannot read image .*images/5\.png", lazy=True),
    Case("manifest names a missing image", lambda t: jsonl_config(t, ['{"image": "images/gone.png", "label": "a"}']),
         r"data\.jsonl:1: image file not found: .*images/gone\.png"),
    Case("manifest label out of range", lambda t: jsonl_config(t, [None, None, '{"image": "images/2.png", "label": -1}']),
         r"data\.jsonl:3: label -1 is out of range"),
    Case("manifest label is a float", lambda t: jsonl_config(t, ['{"image": "images/0.png", "label": 1.5}']),
         r"data\.jsonl:1: label 1\.5 is neither a class name"),
    Case("manifest label is a bool", lambda t: jsonl_config(t, [None, '{"image": "images/1.png", "label": true}']),
         r"data\.jsonl:2: label True is neither a class name"),
    Case("manifest mixes names and ids", lambda t: jsonl_config(t, [None, '{"image": "images/1.png", "label": 1}']),
         r"data\.jsonl:2: label 1 mixes class names and class ids \(line 1 has 'a'\)"),
    Case("manifest empty label", lambda t: jsonl_config(t, [None, None, None, '{"image": "images/3.png", "label": " "}']),
         r"data\.jsonl:4: field 'label' is empty"),
    Case("manifest missing field", lambda t: jsonl_config(t, [None, '{"image": "images/1.png"}']),
         r"data\.jsonl:2: missing field 'label'"),
    Case("manifest non-UTF-8 line", lambda t: jsonl_config(t, [None, None, b'{"image": "images/2.png", "label": "\xe9"}']),
         r"data\.jsonl:3: not valid UTF-8 \(byte 0xe9"),
    Case("manifest invalid JSON", lambda t: jsonl_config(t, [None, '{"image": "images/1.png", "label": "a"']),
         r"data\.jsonl:2: not valid JSON"),
    Case("manifest line not an object", lambda t: jsonl_config(t, ['["images/0.png", "a"]']),
         r"data\.jsonl:1: expected a JSON object, got an array"),
    Case("manifest with another label field", lambda t: jsonl_config(t, label_column="class"),
         r"data\.jsonl:1: missing field 'class'"),
    Case("missing local hf dataset", override("data.source=hf", "data.image_size=[8,8]", "data.path=./no_hf_data"),
         r"data\.path: directory not found: \./no_hf_data"),
    Case("hf label beyond the class names", lambda t: hf_config(t, [0, 1, 2, 1, 0, 2], [0, 1, 3]),
         r"hf split 'test' row 2: label 3 in column 'label' is out of range 0\.\.2"),
    Case("hf negative label", lambda t: hf_config(t, [0, 1, 2, 1, 0, 2], [-1, 1]),
         r"hf split 'test' row 0: label -1 .*out of range"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_naming_the_problem(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = case.make(tmp_path)
    if case.lazy:
        monkeypatch.setattr(dsmod, "EAGER_MAX_ITEMS", 0)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    if case.lazy:  # the data was built: the bad file was met later, by the training loader
        assert "data: 5 train" in out
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"kdkit {argv[0]}: error: "), err  # the error line comes first, nothing before it
    assert len(lines) <= 1 + MAX_DETAIL_LINES and all(": error: " not in line for line in lines[1:]), err
    assert re.search(case.expect, err), f"{case.expect!r} not in:\n{err}"


# ---- a rejected command loses nothing already written ------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kept")
    path = write_yaml(tmp / "c.yaml", tiny_config(tmp / "run", teacher=None, train__save_every=None))
    assert main(["train", str(path), "--no-report"]) == 0
    bad_manifest = manifest(tmp, [None, '{"image": "images/1.png", "label": -3}'])
    return path, tmp / "run", bad_manifest


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


BAD_DATA = ["data.source=jsonl", "data.image_size=[8,8]"]


@pytest.mark.parametrize("words", [
    ["train.lr=-1"],
    ["--resume", "train.lrr=1"],
    ["--overwrite", "train.lr=-1"],
    ["--overwrite", "student.factory=nowhere.py:f"],
    pytest.param(["--resume", *BAD_DATA], id="resume-bad-data"),
    pytest.param(["--overwrite", *BAD_DATA], id="overwrite-bad-data"),
    pytest.param(["--resume", "seed=1"], id="resume-changed-seed"),
])
def test_a_rejected_train_leaves_the_existing_run_untouched(finished_run, words, capsys):
    path, run, bad_manifest = finished_run
    if BAD_DATA[0] in words:
        words = [*words, f"data.path={bad_manifest}"]
    before = snapshot(run)
    assert main(["train", str(path), *words]) == 2
    assert "Traceback" not in capsys.readouterr().err
    after = snapshot(run)
    assert sorted(after) == sorted(before)
    assert [name for name in before if after[name] != before[name]] == []
