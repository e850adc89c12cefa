"""params.yaml is parsed into frozen objects that reject unknown keys and impossible values."""

import pytest
import yaml

from stages.params import ParamsError, load, parse
from tests.conftest import ROOT


def raw_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_project_params_load_and_are_frozen():
    params = load(ROOT / "params.yaml")
    assert params.split.ratios == {"train": 0.8, "validation": 0.1, "test": 0.1}
    assert params.model.trust_remote_code is False
    with pytest.raises(Exception):
        params.train.epochs = 10


@pytest.mark.parametrize(
    "section, key, expected",
    [("train", "epochz", "train.epochz"), ("clean", "lowercse", "clean.lowercse"), (None, "trian", "trian")],
)
def test_unknown_key_is_an_error_that_names_it(section, key, expected):
    raw = raw_params()
    (raw[section] if section else raw)[key] = 1
    with pytest.raises(ParamsError, match=expected):
        parse(raw)


def test_wrong_type_and_range_are_errors():
    raw = raw_params()
    raw["train"]["batch_size"] = 0
    raw["split"]["ratios"] = {"train": 0.8, "validation": 0.3, "test": 0.1}
    with pytest.raises(ParamsError) as info:
        parse(raw)
    assert "train.batch_size" in str(info.value)
    assert "sum to 1" in str(info.value)


def test_min_per_class_must_reach_every_split():
    raw = raw_params()
    raw["validate"]["min_per_class"] = 5
    with pytest.raises(ParamsError, match="min_per_class = 5 is too small"):
        parse(raw)


def test_unknown_fallback_encoding_is_rejected():
    raw = raw_params()
    raw["clean"]["fallback_encoding"] = "latin-99"
    with pytest.raises(ParamsError, match="unknown encoding"):
        parse(raw)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml: not found"):
        load(tmp_path / "nope.yaml")
