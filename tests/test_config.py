"""Config presets, overrides and their errors."""

from pathlib import Path

import pytest

from geovlm.config import (
    PRESET_DIR,
    ConfigError,
    RunConfig,
    config_from_dict,
    describe_options,
    load_config,
    save_config,
)


def test_default_preset_loads_and_matches_yaml():
    config = load_config()
    assert config.name == "tiny-cpu"
    assert config.model.path is None
    assert [s.kind for s in config.stages][0] == "sft"


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_shipped_preset_is_valid(preset):
    config = load_config(preset)
    assert config.stages


def test_overrides_by_index_name_and_nested():
    config = load_config(
        None,
        [
            "stages.sft.steps=7",
            "stages.0.lr=0.5",
            "model.tiny.hidden_size=64",
            "data.tasks=[scene_cls, vqa]",
            "stages.sft.task_weights={}",
            "model.path=/models/x",
            "stages.sft.delta=null",
        ],
    )
    assert config.stages[0].steps == 7
    assert config.stages[0].lr == 0.5
    assert config.model.tiny.hidden_size == 64
    assert config.data.tasks == ["scene_cls", "vqa"]
    assert config.model.path == "/models/x"


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["stages.sft.lr=1"]).stages[0].lr == 1.0
    with pytest.raises(ConfigError, match="stages.0.steps"):
        load_config(None, ["stages.sft.steps=1.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.sft.stepz=3", "stepz"),
        ("stages.sft.steps=abc", "expected an int"),
        ("model.dtype=float8", "not one of"),
        ("nokey=1", "nokey"),
        ("stages.grpo_x.steps=1", "no list item named"),
        ("stages.9.steps=1", "out of range"),
        ("model.gradient_checkpointing=maybe", "true/false"),
        ("noequals", "key=value"),
        ("data.object_scale=0", "data.object_scale .*object_scale must be in"),
        ("data.max_objects=1", "data.object_scale / data.max_objects: max_objects"),
        ("data.n_test_scenes_by_task={referred_dett: 300}", "n_test_scenes_by_task: unknown"),
        ("data.n_test_scenes_by_task={vqa: -1}", "n_test_scenes_by_task: counts must be"),
        ("data.n_test_scenes_by_task={vqa: many}", "n_test_scenes_by_task.*expected an int"),
        ("stages.sft.task_weights={referred_det: 0}", "task_weights: weights must be ints >= 1"),
        ("stages.sft.task_weights={referred_dett: 2}", "sft.task_weights: unknown task"),
        ("stages.grpo_labels.task_weights={vqa: 1.5}", "task_weights.*expected an int"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_more_test_scenes_only_for_the_runs_tasks():
    from geovlm.data.sources import load_splits

    config = load_config(None, ["data.n_test_scenes_by_task={referred_det: 3, vqa: 2}"])
    assert config.data.n_test_scenes_by_task == {"referred_det": 3, "vqa": 2}
    # A run without one of the tasks keeps the others' counts and is no error.
    sizes = ["data.n_train_scenes=0", "data.n_val_scenes=0", "data.n_test_scenes=1"]
    narrowed = load_config(None, [*sizes, "data.tasks=[scene_cls, referred_det]",
                                  "data.n_test_scenes_by_task={referred_det: 3, vqa: 2}"])
    test = load_splits(narrowed.data, "qwen25vl")["test"]
    assert sorted(s.task for s in test) == ["referred_det"] * 3 + ["scene_cls"]


def test_task_weights_only_for_the_stages_tasks():
    config = load_config(None, ["stages.sft.task_weights={referred_det: 4}"])
    assert config.stages[0].task_weights == {"referred_det": 4}
    with pytest.raises(ConfigError, match=r"grpo_labels.task_weights: \['counting'\] not among"):
        load_config(None, ["stages.grpo_labels.task_weights={counting: 2}"])


def test_unknown_key_in_yaml_names_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel:\n  pth: /x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.pth"):
        load_config(str(path))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="neither a YAML file nor a preset"):
        load_config("no-such-preset")


def test_saved_config_round_trips(tmp_path: Path):
    import yaml

    config = load_config(None, ["stages.sft.steps=3", "seed=5"])
    save_config(config, tmp_path / "c.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again == config


def test_help_lists_every_stage_field():
    text = describe_options()
    for key in ("model.path", "data.n_train_scenes", "stages.<i>.loss_type", "eval.batch_size"):
        assert key in text
    assert isinstance(RunConfig().run_dir, Path)


def test_a_replaced_stage_list_gets_defaults_for_later_overrides():
    config = load_config(
        None, ["stages=[{name: a, kind: grpo}, {name: b}]", "stages.a.steps=3", "stages.b.lr=0.5"]
    )
    assert [s.name for s in config.stages] == ["a", "b"]
    assert config.stages[0].steps == 3 and config.stages[0].kind == "grpo"
    assert config.stages[1].lr == 0.5 and config.stages[1].batch_size == 16


def test_on_off_choices_survive_yaml_booleans():
    assert load_config(None, ["model.fused_linear_loss=on"]).model.fused_linear_loss == "on"
    assert load_config(None, ["model.fused_linear_loss=off"]).model.fused_linear_loss == "off"
