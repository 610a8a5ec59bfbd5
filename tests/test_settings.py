"""Every numeric setting is checked for type and finiteness at the boundary, naming the flag or the
key: `nan < 0` is False, so a range check alone would let NaN through."""
import json
import math
import subprocess
import sys

import pytest

from aerl_fast import train
from aerl_fast.cli import number
from aerl_fast.config import RunOptions, TrainConfig, load_preset
from aerl_fast.errors import ConfigError
from aerl_fast.evaluate import EvalConfig


@pytest.mark.parametrize("argv, message", [
    (["--adv-beta", "nan"], "--adv-beta must be a finite number, got nan"),
    (["--adv-eps", "nan"], "--adv-eps must be a finite number, got nan"),
    (["--explore-eps", "nan"], "--explore-eps must be a finite number, got nan"),
    (["--width", "inf"], "--width must be a finite number, got inf"),
    (["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number, got inf"),
    (["--batch-size", "64.5"], "invalid integer value: '64.5'"),
    (["--lr=-inf"], "--lr must be a finite number, got -inf"),
    (["--width", "1e9"], "--width must be <= 16, got 1e+09"),
    (["--image-size", "100000"], "--image-size must be <= 1024, got 100000"),
    (["--warmup-epochs", "9", "--epochs", "2"], "--warmup-epochs 9 exceeds --epochs 2"),
    (["--checkpoint-minutes", "nan"], "--checkpoint-minutes must be a finite number, got nan"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_numbers_on_the_command_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--out", str(tmp_path / "r"), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {message}" or message in err[-1], err
    assert not (tmp_path / "r").exists()  # a failed start leaves no folder behind


def test_good_values_pass_the_same_checks():
    cfg = TrainConfig(adv_beta=0.0, width=16.0, warmup_epochs=6, epochs=6, lr=1e-9).validate()
    assert cfg.width == 16.0 and cfg.adv_beta == 0.0
    assert TrainConfig(batch_size=64.0).validate().batch_size == 64  # an integral float is the integer
    assert isinstance(TrainConfig(lr=1).validate().lr, float)


@pytest.mark.parametrize("values, message", [
    ({"batch_size": 64.5}, "batch_size must be an integer, got 64.5"),
    ({"lr": "1e-3"}, "lr must be a number, got '1e-3'"),
    ({"epochs": [1, 2]}, "epochs must be an integer, got [1, 2]"),
    ({"hflip": "yes"}, "hflip must be true or false, got 'yes'"),
    ({"adv_beta": float("nan")}, "adv_beta must be a finite number, got nan"),
    ({"model": 3}, "model must be a string, got 3"),
    ({"model": "vgg"}, "model must be one of"),
    ({"colour": 1}, "unknown key(s) colour"),
    ({"device": ["cpu"]}, "device must be a string, got ['cpu']"),
])
def test_bad_values_in_a_preset_file_name_the_file_and_key(values, message, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError) as e:
        load_preset(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a string"', "[" * 100000])
def test_a_malformed_preset_is_one_line_on_the_cli(text, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "aerl_fast.train", "--preset", str(path), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {path}")


def test_a_tampered_config_json_is_refused_on_resume(tmp_path):
    out = tmp_path / "run"
    train.run(TrainConfig(dataset="shapes", width=0.125, train_subset=128, batch_size=64, epochs=1),
              RunOptions(out=str(out), progress=False))
    saved = json.loads((out / "config.json").read_text())
    for key, value, message in (("batch_size", 64.5, "batch_size must be an integer"),
                                ("lr", "fast", "lr must be a number"), ("seed", None, "seed needs a value")):
        (out / "config.json").write_text(json.dumps(dict(saved, **{key: value})))
        with pytest.raises(ConfigError, match=message):
            train.resume(out, changes={"epochs": 2})
    (out / "config.json").write_text("{truncated")
    with pytest.raises(ConfigError, match="config.json: invalid JSON"):
        train.resume(out)


@pytest.mark.parametrize("text, value", [("0.5", 0.5), ("8/255", 8 / 255), (" 1e-3 ", 1e-3), ("3", 3.0)])
def test_fraction_parser(text, value):
    assert number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["8/0", "a/b", "", "1/2/3", "eight"])
def test_fraction_parser_refuses(text):
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="not a number"):
        number(text)


def test_eval_config_checks_are_the_same_checks():
    with pytest.raises(ConfigError, match="--steps must be >= 1, got 0"):
        EvalConfig(steps=0).validate()
    with pytest.raises(ConfigError, match="--rel-step must be a finite number, got nan"):
        EvalConfig(rel_step=math.nan).validate()
    with pytest.raises(ConfigError, match="--eps must be >= 0"):
        EvalConfig(eps=(-1.0,)).validate()
    assert EvalConfig(eps=(0.5,)).validate().radii("pgd-l2") == (0.5,)
