"""A new task from this one file: registered, then read, generated, rewarded, trained, evaluated.

``largest_color`` asks for the colour of the largest object of a scene. Nothing outside this file
knows it: the trainer gets it through ``data.task_modules=[<this module>]`` (the route torchrun
ranks take), the evaluation CLI through the checkpoint's ``run_config.yaml``. Oracles: the scene's
objects (largest box area) and hand-written answers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest

from geovlm.data.readers import Exchange
from geovlm.data.scenes import OBJECT_COLORS
from geovlm.data.schema import Target
from geovlm.data.synthetic import REGION_PHRASE, SceneContext, region_of
from geovlm.metrics import MetricOptions, sample_mean
from geovlm.rewards.options import RewardOptions
from geovlm.rewards.parse import ParseOptions, parse_label
from geovlm.tasks import TaskSpec, registry
from tests.test_train import TINY_MODEL

COLORS = tuple(sorted({color for colors in OBJECT_COLORS.values() for color in colors}))


def parse(answer: str, target: Target, options: ParseOptions) -> str | None:
    return parse_label(answer, COLORS, options.synonyms)


def accuracy(
    parsed: Sequence[str | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    pairs = zip(parsed, targets, strict=True)
    return np.array([float(p is not None and p == t.label) for p, t in pairs])


def metrics(
    answers: Sequence[str | None], targets: Sequence[Target], options: MetricOptions
) -> dict[str, float]:
    named = [parse_label(a, COLORS) if a else None for a in answers]
    return {
        "accuracy": sample_mean([n == t.label for n, t in zip(named, targets, strict=True)]),
        "answered": sample_mean([n is not None for n in named]),
    }


def from_record(exchange: Exchange) -> Target:
    label = parse_label(exchange.plain_answer(), COLORS)
    if label is None:
        raise exchange.error(f"not one colour of {COLORS}: {exchange.answer!r}")
    return Target(exchange.task, label, exchange.image_size, label=label, classes=COLORS)


def generate(ctx: SceneContext) -> tuple[str, str, Target]:
    largest = max(ctx.objects, key=lambda o: o.area)
    where = REGION_PHRASE[region_of(largest, ctx.size)]
    think = f"The largest object is the {largest.category} {where}."
    target = ctx.target(largest.color, label=largest.color, classes=COLORS)
    return ctx.prompt(), think, target


LARGEST_COLOR = TaskSpec(
    name="largest_color",
    description="the colour of the largest object",
    parse=parse,
    accuracy=accuracy,
    metrics={"geovlm": metrics},
    headline="accuracy",
    prompts={"default": ("What colour is the largest object?", "Which colour is the biggest one?")},
    generate=generate,
    from_record=from_record,
    aliases=("largest_colour",),
)

SPECS = (LARGEST_COLOR,)

TINY = [
    *TINY_MODEL,
    "data.n_train_scenes=4",
    "data.n_val_scenes=1",
    "data.n_test_scenes=2",
    "data.n_test_scenes_by_task={}",
    "threads=1",
]


@pytest.fixture
def unregistered():
    """The test starts and ends without ``largest_color`` in the registry."""
    assert "largest_color" not in registry.names()
    yield
    if "largest_color" in registry.names():
        registry.unregister("largest_color")


def wrap(answer: str) -> str:
    return f"<think>looking</think><answer>{answer}</answer>"


def test_every_entry_point_takes_the_registered_task(tmp_path, unregistered):
    from geovlm.data.readers import read_samples
    from geovlm.data.synthetic import embedded_splits, generate_scenes, samples_from_scene
    from geovlm.metrics import task_metrics
    from geovlm.rewards import parse_for_task, score

    with pytest.raises(ValueError, match="unknown task"):
        Target("largest_color", "red", (8, 8))
    with pytest.raises(ValueError, match="unknown or no tasks"):
        samples_from_scene(generate_scenes(0, 1)[0], ["largest_color"])
    registry.import_task_modules([__name__])
    assert registry.names()[-1] == "largest_color"
    assert registry.resolve("Largest-Colour") == "largest_color"

    scenes = generate_scenes(3, 5)
    samples = [s for scene in scenes for s in samples_from_scene(scene, ["largest_color"])]
    for scene, sample in zip(scenes, samples, strict=True):
        largest = max(scene.before.objects, key=lambda o: o.area)
        assert sample.target.answer == largest.color and sample.images == [scene.before.image]
        assert sample.prompt in LARGEST_COLOR.prompts["default"]
    # A registered task leaves the built-in tasks' samples as they were.
    mixed = samples_from_scene(scenes[0], ["vqa", "largest_color", "counting"])
    alone = samples_from_scene(scenes[0], ["vqa", "counting"])
    assert [s.response for s in mixed[::2]] == [s.response for s in alone]
    assert embedded_splits(0, 2, 1, 1, tasks=["largest_color"])["test"][0].task == "largest_color"

    target = samples[0].target
    other = next(c for c in COLORS if c != target.label)
    completions = [samples[0].response, wrap(other), wrap(f"{target.label} or {other}"), "no"]
    assert parse_for_task(target.label.upper(), target) == target.label
    batch = score("largest_color", completions, [target] * 4)
    np.testing.assert_array_equal(batch.components["format"], [1, 1, 0, 0])
    np.testing.assert_array_equal(batch.components["accuracy"], [1, 0, 0, 0])
    weighted = score("largest_color", completions, [target] * 4, {"largest_color": {"format": 0}})
    np.testing.assert_array_equal(weighted.total, [1, 0, 0, 0])
    got = task_metrics("largest_color", completions, [target] * 4)
    assert got == {"accuracy": 0.25, "answered": 0.5}

    image = tmp_path / "tile.png"
    samples[0].images[0].save(image)
    records = [
        {"image": "tile.png", "problem": "Colour of the largest object?", "solution": "Red.",
         "type": "Largest-Colour"},
        {"image": "tile.png", "problem": "And now?", "solution": "<answer>grey</answer>",
         "task": "largest_color"},
    ]
    data = tmp_path / "colors.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    read = read_samples(data)
    assert [(s.task, s.target.label) for s in read] == [
        ("largest_color", "red"),
        ("largest_color", "gray"),
    ]
    data.write_text(json.dumps({**records[0], "solution": "a big one"}) + "\n")
    with pytest.raises(ValueError, match=r"colors.jsonl: record 0 \(line 1\).*not one colour"):
        read_samples(data)

    registry.unregister("largest_color")
    with pytest.raises(ValueError, match="unknown task"):
        score("largest_color", completions, [target] * 4)


def test_a_task_from_one_file_trains_and_evaluates_end_to_end(tmp_path, unregistered):
    from geovlm.eval import main as eval_main
    from geovlm.train import main as train_main

    stages = (
        "stages=[{name: sft, kind: sft, steps: 3, batch_size: 4, save_every: 0},"
        " {name: grpo, kind: grpo, steps: 1, batch_size: 2, num_generations: 2,"
        "  max_new_tokens: 6, save_every: 0}]"
    )
    code = train_main([
        f"output_dir={tmp_path}", "name=colour", *TINY, stages,
        f"data.task_modules=[{__name__}]", "data.tasks=[largest_color]",
        "eval.max_new_tokens=6", "eval.sampled_generations=2",
    ])
    assert code == 0
    run_dir = tmp_path / "colour"
    held_out = json.loads((run_dir / "summary.json").read_text())["held_out"]
    assert list(held_out) == ["init", "sft", "grpo"]
    for label in held_out:
        assert list(held_out[label]) == ["largest_color"]
        (metric, value), = held_out[label]["largest_color"].items()
        assert metric == "accuracy"
        assert 0.0 <= value <= 1.0
    grpo = json.loads((run_dir / "stages/1-grpo/eval/metrics.json").read_text())
    assert set(grpo["metrics"]["largest_color"]) >= {"n", "accuracy", "answered", "reward"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "grpo" and "reward" in r for r in rows)

    # The evaluation CLI learns the task from the checkpoint's run_config.yaml.
    registry.unregister("largest_color")
    out = tmp_path / "eval"
    final = run_dir / "stages/1-grpo/final"
    code = eval_main([
        "--checkpoint", str(final), "--data", "embedded", "--out", str(out),
        "--max-new-tokens", "6", "--device", "cpu",
    ])
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["summary"]["largest_color"][0] == "accuracy"
    assert report["metrics"]["largest_color"]["n"] == 2
    lines = (out / "predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines]
    assert {p["task"] for p in predictions} == {"largest_color"}
