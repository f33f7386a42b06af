import subprocess
import sys

import pytest
import yaml

from kdkit.config import dump_config, load_config
from kdkit.errors import ConfigError
from kdkit.cli.main import main

from conftest import tiny_config, write_yaml


def test_defaults_filled_and_round_trip(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"student": {"factory": "m:f"}})
    cfg = load_config(path)
    assert cfg.train.scheduler == "cosine" and cfg.distill.temperature == 4.0
    assert [t.kind for t in cfg.distill.terms] == ["ce", "kd"]
    again = write_yaml(tmp_path / "again.yaml", yaml.safe_load(dump_config(cfg)))
    assert load_config(again) == cfg


def test_dotted_overrides_are_typed(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    cfg = load_config(path, ["train.epochs=3", "train.max_steps=null", "data.augment.hflip=true", "student.kwargs.hidden=4",
                             "distill.terms=[{kind: ce}]"])
    assert cfg.train.epochs == 3 and cfg.train.max_steps is None
    assert cfg.data.augment.hflip is True and cfg.student.kwargs["hidden"] == 4
    assert [t.kind for t in cfg.distill.terms] == ["ce"]


@pytest.mark.parametrize("override,path,needle", [
    ("train.lrr=1", "train.lrr", "unknown key"),
    ("train.batch_size=abc", "train.batch_size", "integer"),
    ("train.lr=-0.1", "train.lr", "greater than 0"),
    ("data.val_fraction=1.5", "data.val_fraction", "less than 1"),
    ("distill.terms=[{kind: kd, divergence: nope}]", "distill.terms[0].divergence", "unknown divergence"),
    ("data.source=mnist", "data.source", "fashion_mnist"),
    ("student.pretrained=x", "student", "exactly one"),
])
def test_each_error_names_its_path(tmp_path, override, path, needle):
    cfg_path = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    with pytest.raises(ConfigError) as err:
        load_config(cfg_path, [override])
    paths = [p for p, _ in err.value.problems]
    assert path in paths, err.value
    assert needle in str(err.value)


def test_every_error_at_once(tmp_path):
    cfg_path = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    with pytest.raises(ConfigError) as err:
        load_config(cfg_path, ["train.lr=0", "bogus=1", "eval.batch_size=-3", "noequals"])
    paths = {p for p, _ in err.value.problems}
    assert {"train.lr", "bogus", "eval.batch_size", "noequals"} <= paths


def test_validate_cli_exit_codes(tmp_path, capsys):
    good = write_yaml(tmp_path / "good.yaml", tiny_config(tmp_path / "run"))
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), "train.lr=-1", "train.nope=2"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "train.nope" in err and "Traceback" not in err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    assert main(["validate", str(tmp_path / "broken.yaml")]) == 2
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert main(["validate", str(tmp_path / "list.yaml")]) == 2


def test_python_dash_m_is_the_same_program(tmp_path):
    bad = write_yaml(tmp_path / "bad.yaml", {"student": {"factory": "m:f"}, "train": {"epochs": -1}})
    proc = subprocess.run([sys.executable, "-m", "kdkit", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.epochs" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_files_are_config_errors(tmp_path):
    cfg = tiny_config(tmp_path / "run", teacher={"run": str(tmp_path / "no_run")})
    cfg["student"] = {"factory": f"{tmp_path / 'nofile.py'}:f"}
    cfg["data"] = {"source": "image_folder", "path": str(tmp_path / "nodata")}
    path = write_yaml(tmp_path / "c.yaml", cfg)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    paths = {p for p, _ in err.value.problems}
    assert {"teacher.run", "student.factory", "data.path", "data.image_size"} <= paths


@pytest.mark.parametrize("override,path", [("train.eval_every=0", "train.eval_every"), ("train.save_every=-3", "train.save_every"),
                                           ("train.betas=[1.5, 0.9]", "train.betas"), ("train.scheduler=nope", "train.scheduler")])
def test_loop_settings_checked_before_training(tmp_path, override, path):
    cfg_path = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    with pytest.raises(ConfigError) as err:
        load_config(cfg_path, [override])
    assert [p for p, _ in err.value.problems] == [path]  # one line per key, even for union-typed keys


def test_overrides_may_follow_options(tmp_path, capsys):
    good = write_yaml(tmp_path / "good.yaml", tiny_config(tmp_path / "run"))
    assert main(["validate", str(good), "--print", "train.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    assert main(["validate", str(good), "--print", "train.lr=-1"]) == 2
    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(good), "--bogus"])
    assert exit_.value.code == 2
