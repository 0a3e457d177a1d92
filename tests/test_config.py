"""Config loading: strict keys with suggestions, typed values, overrides, round trips."""

from __future__ import annotations

import pytest

from roar.config import apply_override, config_from_dict, dump_config, load_config, read_yaml
from roar.core.errors import RoarError


def error_of(raw: dict, overrides=()) -> str:
    with pytest.raises(RoarError) as info:
        config_from_dict(raw, overrides)
    return str(info.value)


def test_every_shipped_config_validates(repo):
    for path in sorted((repo / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name == path.stem


def test_misspelt_key_names_it_and_suggests_the_right_one():
    message = error_of({"training": {"epocs": 3}})
    assert "training.epocs" in message and "did you mean 'epochs'" in message


def test_misspelt_top_level_and_dataset_keys():
    assert "did you mean 'model'" in error_of({"modle": {}})
    message = error_of({"dataset": {"name": "shapes", "trian_size": 10}})
    assert "dataset.trian_size" in message and "'train_size'" in message


def test_unknown_component_name_suggests_a_registered_one():
    message = error_of({"dataset": {"name": "shaps"}})
    assert "dataset.name" in message and "did you mean 'shapes'" in message
    assert "did you mean 'resnet8'" in error_of({"model": {"name": "resnet9"}})


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("training.epochs=-1", "training.epochs"),
        ("training.optimizer.lr=abc", "training.optimizer.lr"),
        ("dataset.hard_fraction=120", "dataset.hard_fraction"),
        ("model.widths=[1,2]", "model.widths"),
        ("training.schedule.name=linear", "training.schedule.name"),
        ("device=gpu0", "device"),
    ],
)
def test_bad_values_name_the_key(override, key):
    message = error_of({}, [override])
    assert message.split(": ", 1)[1].startswith(key), message


def test_the_retraining_recipe_is_the_fast_one_unless_told_otherwise():
    from roar.training.recipes import RECIPES

    default = load_config(None).retrain.training
    assert default.recipe == "fast" and default.epochs == RECIPES["fast"]["epochs"] and default.whiten_init
    shorter = load_config(None, ["retrain.training={epochs: 2}"]).retrain.training
    assert shorter.recipe == "fast" and shorter.epochs == 2 and shorter.batch_size == RECIPES["fast"]["batch_size"]
    seed = load_config(None, ["retrain.training={recipe: seed}"]).retrain.training
    assert seed.epochs == 50 and seed.schedule.name == "step"
    plain = load_config(None, ["retrain.training={recipe: null, epochs: 7}"]).retrain.training
    assert plain.recipe is None and plain.epochs == 7 and not plain.whiten_init  # the schema's own defaults
    assert load_config(None, ["retrain.training=base"]).retrain.training == "base"
    message = error_of({}, ["retrain.training.epocs=3"])
    assert "retrain.training.epocs: unknown key 'epocs' (did you mean 'epochs'?)" in message, message
    message = error_of({}, ["retrain.training.recipe=fsat"])
    assert "unknown recipe 'fsat' (did you mean 'fast'?)" in message, message


def test_leakage_takes_true_or_thresholds():
    roar = load_config(None, ["retrain.thresholds=[10, 50, 90]", "retrain.leakage=true"]).retrain
    assert roar.leakage_removed(["roar"]) == [10.0, 50.0, 90.0]
    assert roar.leakage_removed(["roar", "kar"]) == [10.0, 50.0, 90.0]  # KAR's masks are ROAR's complements
    listed = load_config(None, ["retrain.leakage=[30]"]).retrain
    assert listed.leakage_removed(["roar", "kar"]) == [30.0, 70.0] and listed.leakage_removed(["kar"]) == [70.0]
    assert load_config(None).retrain.leakage_removed(["roar", "kar"]) == []
    assert error_of({}, ["retrain.leakage=[0, 50]"]).split(": ", 1)[1].startswith("retrain.leakage")


def test_overrides_parse_yaml_values_and_create_sections():
    cfg = config_from_dict({}, ["training.epochs=7", "model.widths=[4, 8, 16]", "training.snapshots.every_steps=null"])
    assert cfg.training.epochs == 7
    assert cfg.model.widths == [4, 8, 16]
    assert cfg.training.snapshots.every_steps is None
    data: dict = {}
    apply_override(data, "a.b.c=x")
    assert data == {"a": {"b": {"c": "x"}}}
    with pytest.raises(RoarError, match="expected dotted.key=value"):
        apply_override(data, "novalue")


def test_default_output_dir_follows_the_name():
    assert str(config_from_dict({"name": "exp1"}).run_dir) == "runs/exp1"
    assert str(config_from_dict({"name": "exp1", "output_dir": "/tmp/x"}).run_dir) == "/tmp/x"


def test_dumped_config_loads_back_to_the_same_config(tmp_path, repo):
    cfg = load_config(repo / "configs" / "demo.yaml", ["training.epochs=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_method_entries_are_written_back_in_the_form_they_were_given(tmp_path):
    methods = [
        "gradient",
        {"name": "integrated_gradients", "steps": 8},
        {"name": "ig_white", "method": "integrated_gradients", "baseline": "white"},
        {"name": "ig_vg", "method": "noise_tunnel", "base": "integrated_gradients", "base_params": {"steps": 4}},
    ]
    cfg = config_from_dict({"attribution": {"methods": methods}})
    assert [e.method for e in cfg.attribution.entries()] == [
        "gradient",
        "integrated_gradients",
        "integrated_gradients",
        "noise_tunnel",
    ]
    assert cfg.attribution.model_dump(mode="json")["methods"] == methods
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(RoarError, match="config file not found"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(RoarError, match="not valid YAML at line"):
        read_yaml(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(RoarError, match="top level must be a mapping"):
        read_yaml(listing)
