"""The config system: declared keys, typed assignment, overrides, errors naming the key."""
import pytest

from mmcl.config import Config, ConfigError, load_config_file


def _cfg():
  c = Config()
  c.define("seed", 0, "seed")
  o = c.section("optim", "opt")
  o.define("lr", 1e-3, "learning rate")
  o.define("name", "adamw", "optimizer", choices=("adamw", "sgd"))
  o.define("clip", 1.0, "clip", type=(float, type(None)))
  o.define("ks", (1, 5), "ks")
  o.define("flag", False, "flag")
  return c


def test_assignment_and_overrides():
  c = _cfg()
  c.optim.lr = 3  # int accepted for float
  assert c.optim.lr == 3.0 and isinstance(c.optim.lr, float)
  c.override("optim.lr=0.5")
  c.override("optim.name=sgd")
  c.override("optim.clip=None")
  c.override("optim.ks=[1,10]")
  c.override("optim.flag=true")
  c.override("seed=7")
  assert (c.optim.lr, c.optim.name, c.optim.clip, c.optim.ks, c.optim.flag, c.seed) == (
      0.5, "sgd", None, (1, 10), True, 7)
  assert c.to_dict()["optim"]["ks"] == (1, 10)


@pytest.mark.parametrize("assign, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("optimx.lr=1", "unknown config key 'optimx'"),
    ("optim.lr=abc", "config key 'optim.lr' expects float, got str"),
    ("seed=1.5", "config key 'seed' expects int, got float"),
    ("seed=True", "config key 'seed' expects int, got bool"),
    ("optim.name=adam", "config key 'optim.name' must be one of"),
    ("optim.lr", "not of the form key=value"),
])
def test_errors_name_the_key(assign, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    _cfg().override(assign)


def test_attribute_typos_are_errors():
  c = _cfg()
  with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
    c.optim.learning_rate = 1.0
  with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
    _ = c.optim.learning_rate


def test_every_key_documented_and_round_trip():
  from mmcl.tasks import config_from_dict
  c = load_config_file("experiments/clip_shapes.py:tiny")
  text = c.describe()
  assert "train.total_steps = 8" in text and "optimizer steps to run" in text
  again = config_from_dict(c.to_dict())
  assert again.to_dict() == c.to_dict()


def test_unknown_variant_and_missing_file():
  with pytest.raises(ValueError, match="unknown variant 'nope'"):
    load_config_file("experiments/clip_shapes.py:nope")
  with pytest.raises(FileNotFoundError, match="missing.py"):
    load_config_file("experiments/missing.py")
