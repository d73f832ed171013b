"""hpcps.config: one-line errors with suggestions, type checks, bare-name overrides,
and the resolved config written as TOML that loads back to the same values."""

from pathlib import Path

import pytest

from hpcps.config import load_config
from hpcps.config.load import default_config, dump_toml
from hpcps.config.schema import FIELDS, SECTION_HELP, Field
from hpcps.errors import UserError

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]


def error_of(*overrides, path=None) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, list(overrides))
    text = str(info.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    ("ps.stalenes=2", "unknown config key 'ps.stalenes' (did you mean 'ps.staleness'?)"),
    ("stalenes=2", "unknown config key 'stalenes' (did you mean 'ps.staleness'?)"),
    ("zzzz=1", "unknown config key 'zzzz'"),
])
def test_unknown_key_suggests_the_nearest(override, message):
    assert error_of(override) == message


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nbatch_sise = 4\n")
    assert error_of(path=str(path)) == (f"unknown config key 'train.batch_sise' in {path} "
                                        "(did you mean 'train.batch_size'?)")
    path.write_text("[trian]\nlr = 1\n")
    assert "unknown config key 'trian'" in error_of(path=str(path))


@pytest.mark.parametrize("override,message", [
    ("train.batch_size=2.5", "config key 'train.batch_size': expected an integer, got 2.5"),
    ("train.batch_size=true", "config key 'train.batch_size': expected an integer, got True"),
    ("train.lr=fast", "config key 'train.lr': expected a number, got 'fast'"),
    ("train.lr=nan", "config key 'train.lr': expected a finite number, got nan"),
    ("model.bias=1", "config key 'model.bias': expected true or false, got 1"),
    ("out_dir=3", "config key 'out_dir': expected a string, got 3"),
    ("ps.servers=two", "config key 'ps.servers': expected an integer or 'auto', got 'two'"),
    ("train.lr=0", "config key 'train.lr': must be > 0, got 0.0"),
    ("train.batch_size=0", "config key 'train.batch_size': must be >= 1, got 0"),
    ("ps.topk_ratio=2", "config key 'ps.topk_ratio': must be <= 1, got 2.0"),
    ("ps.mode=aps", "config key 'ps.mode': 'aps' is not one of auto, single, bsp, ssp, asp, "
                    "allreduce (did you mean 'asp'?)"),
    ("ps.straggler=1:0.5", "config key 'ps.straggler': expected 'RANK:FACTOR[,RANK:FACTOR...]' "
                           "with FACTOR >= 1, got '1:0.5'"),
])
def test_type_and_range_errors(override, message):
    assert error_of(override) == message


def test_cross_field_checks():
    assert "must be divisible by 'model.n_head'" in error_of("model.n_embd=10", "model.n_head=4")
    assert "'train.min_lr' (0.1) is larger than 'train.lr' (0.01)" in error_of(
        "train.lr=0.01", "train.min_lr=0.1")


def test_override_forms():
    cfg = load_config(None, ["lr=3e-4", "batch_size=7", "ps.servers=2", "bias=true",
                             'out_dir="runs/x y"', "ps.mode = asp"])
    assert cfg.train.lr == 3e-4 and cfg["train.lr"] == 3e-4
    assert cfg.train.batch_size == 7 and cfg.ps.servers == 2 and cfg.model.bias is True
    assert cfg.out_dir == "runs/x y" and cfg.ps.mode == "asp"
    assert load_config(None, ["ps.servers=auto"]).ps.servers == "auto"
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0 and isinstance(
        load_config(None, ["train.lr=1"]).train.lr, float)
    assert error_of("train.lr") == "override 'train.lr' is not of the form key=value"
    assert error_of("=3") == "override '=3' is not of the form key=value"


def test_bare_name_must_be_unique(monkeypatch):
    monkeypatch.setitem(SECTION_HELP, "other", "test only")
    monkeypatch.setitem(FIELDS, "other.lr", Field("other.lr", "float", 1.0, "test only"))
    assert error_of("lr=1") == ("config key 'lr' is ambiguous: use one of train.lr, other.lr")
    assert load_config(None, ["train.lr=0.5"]).train.lr == 0.5


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('out_dir = "a"\n[train]\nlr = 0.01\nmin_lr = 0.001\n')
    cfg = load_config(str(path), ["train.lr=0.02"])
    assert (cfg.out_dir, cfg.train.lr, cfg.train.min_lr) == ("a", 0.02, 0.001)


def test_file_problems_are_one_line(tmp_path):
    assert error_of(path=str(tmp_path / "missing.toml")).startswith("config file not found")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1\n")
    assert error_of(path=str(bad)).startswith(f"config file {bad} is not valid TOML")
    assert error_of(path=str(tmp_path)).startswith("config path is a directory")


@pytest.mark.parametrize("overrides", [
    [],
    ["out_dir=runs/\"quoted\" \\ path", "ps.mode=ssp", "ps.servers=3", "train.lr=3.5e-4",
     "model.bias=true", "ps.straggler=0:2.5,3:1.5", "data.path=/data/ünïcode.h5"],
])
def test_to_toml_round_trip(tmp_path, overrides):
    cfg = load_config(None, overrides)
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    again = load_config(str(path))
    assert again.as_dict() == cfg.as_dict()
    assert again.digest() == cfg.digest()
    for key, value in cfg.as_dict().items():  # types survive too (1.0 stays a float)
        assert type(again[key]) is type(value), key


def test_digest_changes_with_any_value():
    base = default_config()
    assert base.digest() == default_config().digest()
    assert base.replace(train__lr=base.train.lr * 2).digest() != base.digest()


def test_shipped_config_loads():
    cfg = load_config(str(REPO / "configs" / "shakespeare_char.toml"))
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (4, 128, 64)
    assert dump_toml(cfg.as_dict()) == cfg.to_toml()


def test_configuration_reference_is_current():
    """docs/configuration.md is generated from the schema; regenerate it after a change:
    python -m hpcps.config.reference > docs/configuration.md"""
    from pathlib import Path

    from hpcps.config.reference import render_markdown
    from hpcps.config.schema import FIELDS
    text = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert text == render_markdown(), "docs/configuration.md is stale: regenerate it"
    for key in FIELDS:  # every key is documented
        assert f"| `{key}` |" in text
