"""params.yaml is parsed into frozen objects that reject unknown keys and impossible values."""

import pytest
import yaml

from sft_pipeline.params import ParamsError, load, parse
from tests.conftest import DEFAULT_PARAMS


def raw_params() -> dict:
    return yaml.safe_load((DEFAULT_PARAMS).read_text())


def test_project_params_load_and_are_frozen():
    params = load(DEFAULT_PARAMS)
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


def test_a_setting_of_another_task_names_the_key_and_the_task():
    raw = raw_params()
    raw["validate"]["roles"] = ["user", "assistant"]  # an instruction-data setting
    with pytest.raises(ParamsError, match=r"validate\.roles: unknown key \(a typo, or not a setting of task\.type "
                                          r"'classification'\)"):
        parse(raw)


def test_an_unknown_task_type_lists_the_tasks():
    raw = raw_params()
    raw["task"] = {"type": "summarisation"}
    with pytest.raises(ParamsError, match=r"task\.type: 'summarisation' is not a task; choose one of classification"):
        parse(raw)


def test_the_task_section_may_be_omitted_and_means_classification():
    raw = raw_params()
    del raw["task"]
    assert parse(raw).task.type == "classification"


@pytest.mark.parametrize("strategy, block", [("full", "lora"), ("lora", "freeze"), ("freeze", "prompt_tuning"),
                                             ("prompt_tuning", "lora")])
def test_options_of_a_strategy_not_chosen_are_an_error(strategy, block):
    raw = raw_params()
    raw["train"]["strategy"] = strategy
    raw["train"][block] = {}
    with pytest.raises(ParamsError, match=rf"train\.{block}: options of strategy '{block}', but train\.strategy is "
                                          rf"'{strategy}'"):
        parse(raw)


def test_strategy_options_are_checked_and_default_when_absent():
    raw = raw_params()
    raw["train"]["strategy"] = "lora"
    params = parse(raw)
    assert params.train.options().model_dump() == {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
    raw["train"]["lora"] = {"r": 0, "target_modules": [], "rank": 4}
    with pytest.raises(ParamsError) as info:
        parse(raw)
    message = str(info.value)
    assert "train.lora.r: Input should be greater than or equal to 1" in message
    assert "train.lora.target_modules" in message and "train.lora.rank: unknown key" in message
    raw["train"] = {"strategy": "freeze", "freeze": {"trainable_layers": 2}}
    assert parse(raw).train.options().trainable_layers == 2
    raw["train"] = {"strategy": "lora_plus"}
    with pytest.raises(ParamsError, match="train.strategy"):
        parse(raw)
    raw["train"] = {"learning_rate": -1}
    with pytest.raises(ParamsError, match="train.learning_rate"):
        parse(raw)


def test_the_promotion_metric_must_be_one_the_task_logs():
    raw = raw_params()
    raw["mlflow"]["promotion_metric"] = "test_f1_sport"
    assert parse(raw).mlflow.promotion_metric == "test_f1_sport"
    raw["mlflow"]["promotion_metric"] = "test_rougeL"
    with pytest.raises(ParamsError, match="mlflow.promotion_metric: 'test_rougeL' is not a metric of task "
                                          "classification"):
        parse(raw)


def test_the_check_command_exits_2_and_names_the_key(tmp_path, capsys):
    from sft_pipeline.params import main

    raw = raw_params()
    raw["train"]["strategy"] = "full"
    raw["train"]["prompt_tuning"] = {"num_virtual_tokens": 8}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["--params", str(path)]) == 2
    assert "train.prompt_tuning: options of strategy 'prompt_tuning'" in capsys.readouterr().err
    assert main(["--params", str(DEFAULT_PARAMS)]) == 0
    assert "strategy: full" in capsys.readouterr().out
