"""Fuzzing the config loader: whatever lands in a config file or on the command line, `load_config` returns a
Config or raises ConfigError whose every problem names a dotted path; never any other exception.

Derandomized (the same examples on every run, so CI never flakes) and quick: a few hundred examples.
"""

from __future__ import annotations

import re

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

from kdkit.config import load_config  # noqa: E402
from kdkit.config.schema import (AugmentConfig, Config, DataConfig, DistillConfig, EvalConfig, LossTerm,  # noqa: E402
                                 ModelConfig, TrainConfig)
from kdkit.errors import ConfigError  # noqa: E402

from conftest import tiny_config  # noqa: E402

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SECTIONS = (Config, DataConfig, AugmentConfig, ModelConfig, LossTerm, DistillConfig, TrainConfig, EvalConfig)
# mostly real key names (so values reach the validators), some misspelt or odd ones
KEYS = sorted({name for model in SECTIONS for name in model.model_fields}) + ["lrr", "tarin", "", " ", "0", "a.b", "[0]"]
# values a hand-written file or override plausibly holds, plus paths that trip path handling (~user, NUL, too long)
WORDS = ["epoch", "auto", "cosine", "ce", "kd", "dkd", "forward_kl", "image_folder", "jsonl", "hf", "digits", "fp16",
         "~no_such_user_kdkit/x", "/", ".", "a\x00b", "x" * 300 + ".py:f", "m:f", "nowhere.py:f", "./model"]
# override right-hand sides: YAML that parses to odd things, or does not parse
YAML_TEXTS = ["[1, 2", "{a: 1}", "{1: 2}", "{null: 1}", ".nan", "-.inf", "1e400", "null", "~", "0x10", "2001-01-01",
              "!!binary AAAA", "!!python/object:os.system x", "&a [*a]", "[{kind: kd}]", "'quoted'", "", "=", "-1"]

scalars = (st.none() | st.booleans() | st.integers(-(10**6), 10**20) | st.floats() | st.text(max_size=12)
           | st.sampled_from(WORDS))
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6),
                                                                          inner, max_size=3),
    max_leaves=10)


def leaf_paths(model, prefix: str = "") -> list[str]:
    """Every dotted key of the schema: 'train.lr', 'data.augment.hflip', 'student.factory', ..."""
    out = []
    for name, field in model.model_fields.items():
        sub = next((m for m in SECTIONS if m in getattr(field.annotation, "__args__", (field.annotation,))), None)
        out += leaf_paths(sub, f"{prefix}{name}.") if sub not in (None, LossTerm) else [f"{prefix}{name}"]
    return out


PATHS = leaf_paths(Config) + ["student.hf_config.base", "teacher.hf_config.base", "student.kwargs.hidden"]
# real keys, so values reach the validators and the file checks, or random ones
dotted = st.sampled_from(PATHS).map(lambda p: p.split(".")) | st.lists(st.sampled_from(KEYS), min_size=1, max_size=4)
edits = st.lists(st.tuples(dotted, values), max_size=4)
overrides = st.lists(
    st.builds(lambda path, text: ".".join(path) + "=" + text, dotted, st.sampled_from(YAML_TEXTS) | st.text(max_size=10))
    | st.text(max_size=16),
    max_size=3)


def set_in(cfg: dict, path: list[str], value) -> None:
    """cfg[path[0]][path[1]]... = value, replacing whatever is in the way with dicts."""
    node = cfg
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def roots(edited: list[tuple[list[str], object]], words: list[str]) -> set[str]:
    """What a problem's dotted path may start with: a config key, an edited key, an override (or its key)."""
    out = set(Config.model_fields) | {path[0] for path, _ in edited} | {repr(path[0]) for path, _ in edited}
    for word in words:
        key = word.partition("=")[0].strip()
        out |= {word.strip(), repr(word), key, key.split(".")[0]}
    return out


def check(tmp_path, edited, words) -> bool:
    raw = tiny_config(tmp_path / "run")
    for path, value in edited:
        set_in(raw, path, value)
    file = tmp_path / "fuzz.yaml"
    file.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    try:
        cfg = load_config(file, words)
    except ConfigError as err:
        text, allowed = str(err), roots(edited, words)
        assert err.problems and str(file) in text
        for path, msg in err.problems:
            assert path and msg, err.problems
            assert f"  {path}: {msg}" in text
            head = path if path.startswith("'") else re.split(r"[.\[]", path, maxsplit=1)[0]  # '' and 'a.b': quoted keys
            assert path in allowed or head in allowed or head.split("'.")[0] + "'" in allowed, (path, allowed)
        return False
    assert isinstance(cfg, Config)
    return True


@FUZZ
@given(edited=edits, words=overrides)
def test_config_loader_returns_a_config_or_a_config_error(tmp_path, edited, words):
    event("loaded" if check(tmp_path, edited, words) else "rejected")  # --hypothesis-show-statistics


@FUZZ
@given(content=st.binary(max_size=200) | st.text(max_size=200))
def test_any_file_content_is_a_config_or_a_config_error(tmp_path, content):
    file = tmp_path / "fuzz.yaml"
    file.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    try:
        load_config(file)
    except ConfigError as err:
        assert str(file) in str(err) and err.problems


PATH_FIELDS = ["data.path", "student.factory", "teacher.run", "teacher.pretrained", "teacher.hf_config.base"]


@FUZZ
@given(field=st.sampled_from(PATH_FIELDS), source=st.sampled_from(["image_folder", "fashion_mnist", "hf", "jsonl"]),
       value=st.sampled_from(WORDS) | st.text(max_size=20) | st.text(max_size=20).map(lambda t: f"{t}.py:f"))
def test_odd_paths_are_problems_not_crashes(tmp_path, field, source, value):
    """The file checks meet every path a config names: '~nobody/x', NUL bytes and over-long names included."""
    edited = [(["data", "source"], source), (["data", "image_size"], [8, 8])]
    if field.startswith("teacher."):
        edited.append((["teacher"], {}))  # the teacher comes from this field alone
    event("loaded" if check(tmp_path, [*edited, (field.split("."), value)], []) else "rejected")


def test_the_fuzzer_reaches_valid_and_invalid_configs(tmp_path):
    """The corpus above is not all rejections: a plain edit loads, a bad one names its path."""
    assert check(tmp_path, [(["train", "lr"], 0.5)], ["train.epochs=2"])
    with pytest.raises(ConfigError, match=r"train\.lr: Input should be a finite number"):
        load_config(tmp_path / "fuzz.yaml", ["train.lr=.inf"])
