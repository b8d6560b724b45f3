"""``python -m geovlm.train`` refuses instead of silently doing the wrong thing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import geovlm.train as train_module
from geovlm.config import ConfigError, load_config
from geovlm.rundir import config_differences, flatten
from geovlm.train import main
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[1]
NO_STAGES = [*TINY, "stages=[]"]


def argv(tmp_path, name="run", *extra):
    return [f"output_dir={tmp_path}", f"name={name}", *NO_STAGES, *extra]


# --------------------------------------------------------------------------- run folders


def test_a_changed_config_under_an_existing_name_is_refused(tmp_path, capsys):
    assert main(argv(tmp_path, "run", "seed=1")) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    capsys.readouterr()
    assert main(argv(tmp_path, "run", "seed=2", "data.n_train_scenes=5")) == 2
    err = capsys.readouterr().err
    assert "seed: 1 (saved) -> 2 (now)" in err
    assert "data.n_train_scenes: 4 (saved) -> 5 (now)" in err
    assert "name=" in err and "--existing-run overwrite" in err and "resume-changed" in err
    # Nothing was touched: the folder still describes its checkpoints.
    assert (tmp_path / "run" / "config.yaml").read_text() == saved


def test_an_identical_rerun_resumes_and_says_so(tmp_path, capsys):
    assert main(argv(tmp_path)) == 0
    capsys.readouterr()
    assert main(argv(tmp_path, "run", "threads=2")) == 0  # resumable key: may differ
    assert "(resumed)" in capsys.readouterr().out


def test_overwrite_starts_again_and_resume_changed_keeps_the_old_config(tmp_path):
    assert main(argv(tmp_path, "run", "seed=1")) == 0
    (tmp_path / "run" / "stale.txt").write_text("from the old run")
    assert main(["--existing-run", "overwrite", *argv(tmp_path, "run", "seed=2")]) == 0
    assert not (tmp_path / "run" / "stale.txt").exists()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["seed"] == 2
    assert main(["--existing-run", "resume-changed", *argv(tmp_path, "run", "seed=3")]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.1.yaml").read_text())["seed"] == 2
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["seed"] == 3


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(argv(tmp_path)) == 2
    assert "no config.yaml" in capsys.readouterr().err
    assert (tmp_path / "run" / "notes.txt").exists()


def test_config_differences_sees_nested_and_stage_keys():
    old = load_config(None, []).to_dict()
    new = load_config(None, ["stages.sft.steps=5", "eval.batch_size=3"]).to_dict()
    assert config_differences(old, new) == [("stages.0.steps", old["stages"][0]["steps"], 5)]
    assert flatten({"a": {"b": 1}, "s": [{"n": 2}], "l": [1, 2]}) == {
        "a.b": 1,
        "s.0.n": 2,
        "l": [1, 2],
    }


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-3", 1e-3),
        ("1E-3", 1e-3),
        ("3.0e-4", 3e-4),
        ("5", 5.0),
        (".5", 0.5),
        ("1_000.5", 1000.5),
    ],
)
def test_every_python_float_spelling_is_accepted(text, value):
    assert load_config(None, [f"stages.sft.lr={text}"]).stages[0].lr == pytest.approx(value)


@pytest.mark.parametrize("text", ["fast", "nan", "inf", "1e-3x"])
def test_non_floats_and_non_finite_floats_are_refused(text):
    with pytest.raises(ConfigError, match="stages.0.lr"):
        load_config(None, [f"stages.sft.lr={text}"])


def test_a_task_typo_is_refused_before_any_model_is_built(tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr("geovlm.model.build_policy", never)
    code = main([f"output_dir={tmp_path}", "stages.grpo_labels.tasks=[multilabel_cls, vqaa]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "stages.grpo_labels.tasks" in err and "vqaa" in err and "counting" in err
    assert not (tmp_path / "tiny-cpu").exists()


def test_a_stage_left_without_tasks_is_refused_before_any_model_is_built(tmp_path, capsys):
    code = main([f"output_dir={tmp_path}", "data.tasks=[scene_cls]"])
    assert code == 2
    # The preset's SFT weighs referred detection: a weight for a task the run drops is refused.
    assert "stages.sft.task_weights: ['referred_det']" in capsys.readouterr().err
    code = main([f"output_dir={tmp_path}", "data.tasks=[scene_cls]", "stages.sft.task_weights={}"])
    assert code == 2
    assert "stages.grpo_det.tasks" in capsys.readouterr().err  # the first GRPO stage
    assert not (tmp_path / "tiny-cpu").exists()


# --------------------------------------------------------------------------- --help


def test_help_shows_choices_tasks_the_presets_values_and_the_run_name(capsys):
    with pytest.raises(SystemExit):
        main(["--config", "qwen2.5-vl-3b", "--help"])
    text = capsys.readouterr().out
    assert "one of grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo" in text
    assert "one of sft | grpo" in text and "one of ddp | fsdp2 | deepspeed" in text
    assert "referred_det_rot" in text and "temporal_cls" in text
    assert "name = 'qwen2.5-vl-3b'" in text and "the run folder is output_dir/name" in text
    assert "model.dtype = 'bfloat16'" in text  # the preset's value, not the default 'auto'
    assert re.search(r"stage 1: name='grpo_detection', kind='grpo', tasks=\[", text)


# --------------------------------------------------------------------------- the README


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in joined.splitlines() if "geovlm.train" in line]


def test_the_readme_training_commands_parse_and_refuse_nothing_of_their_own(tmp_path):
    commands = [c for c in readme_commands() if "--config" in c and "--help" not in c]
    assert commands, "the README shows how to train a real checkpoint"
    data = tmp_path / "train.json"
    data.write_text("[]")
    for command in commands:
        words = command.split()
        args = words[words.index("geovlm.train") + 1 :]
        parsed = train_module.parse_args(args)
        overrides = [o if not o.startswith("data.train=") else f"data.train={data}"
                     for o in parsed.overrides]
        config = load_config(parsed.config, overrides)
        assert config.data.val is None or Path(config.data.val).suffix
        assert config.data.test != "embedded"


def test_a_data_file_with_the_tiny_preset_is_not_evaluated_on_the_synthetic_world(tmp_path):
    with pytest.raises(ConfigError, match="data.val='embedded'"):
        load_config(None, [f"data.train={tmp_path / 'mine.json'}"])
    config = load_config(
        None, [f"data.train={tmp_path / 'mine.json'}", "data.val=null", "data.test=null"]
    )
    assert config.data.test is None


def test_the_readme_refers_to_nothing_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert "../" not in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target


# --------------------------------------------------------------------------- interruptions


def test_an_interrupted_evaluation_is_completed_on_the_rerun(tmp_path, monkeypatch, capsys):
    import geovlm.grpo

    stages = (
        "stages=[{name: sft, kind: sft, steps: 1, batch_size: 2, save_every: 0},"
        " {name: grpo, kind: grpo, tasks: [scene_cls], steps: 1, batch_size: 2,"
        "  num_generations: 2, max_new_tokens: 4}]"
    )
    args = [
        f"output_dir={tmp_path}",
        "name=run",
        *TINY,
        "data.tasks=[scene_cls]",
        "eval.enabled=true",
        "eval.max_new_tokens=4",
        "eval.sampled_generations=2",
        stages,
    ]
    original = geovlm.grpo.sampled_reward

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(geovlm.grpo, "sampled_reward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    run_dir = tmp_path / "run"
    assert (run_dir / "stages" / "1-grpo" / "final" / "config.json").is_file()
    assert not (run_dir / "summary.md").exists()
    for plot in ("training_curves.png", "held_out.png"):
        (run_dir / plot).unlink(missing_ok=True)
    monkeypatch.setattr(geovlm.grpo, "sampled_reward", original)
    capsys.readouterr()
    assert main(args) == 0
    # The sampled-reward objective shows its progress, before and after the stage.
    err = capsys.readouterr().err
    assert "objective grpo (before)" in err and "objective grpo (after)" in err
    summary = (run_dir / "summary.md").read_text()
    assert "| grpo | scene_cls |" in summary  # the GRPO-objective row
    saved = json.loads((run_dir / "summary.json").read_text())
    assert set(saved["held_out"]) == {"init", "sft", "grpo"}
    assert saved["grpo_objective"]["grpo"]["before"]["reward"] >= 0
    assert (run_dir / "training_curves.png").is_file()
    assert (run_dir / "held_out.png").is_file()  # redrawn from the saved evaluations
    assert saved["trained"] == {"sft": ["scene_cls"], "grpo": ["scene_cls"]}
    assert 0 < saved["blind"]["scene_cls"] <= 1
    assert "| scene_cls | accuracy |" in summary
