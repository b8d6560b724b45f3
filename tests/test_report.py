"""The run's report: summary table, image-blind baselines, held-out rows, and the plots."""

import json

import numpy as np
import pytest
from PIL import Image

from geovlm import plots, report
from geovlm.data.schema import Sample, Target
from geovlm.heldout import blind_baseline, majority_baseline, prompt_prior_baseline

SUMMARIES = {
    "init": {"scene_cls": {"accuracy": 0.2}, "referred_det": {"acc@0.5": 0.0, "mean_iou": 0.01}},
    "sft": {"scene_cls": {"accuracy": 0.9}, "referred_det": {"acc@0.5": 0.2, "mean_iou": 0.3}},
    "grpo_det": {
        "scene_cls": {"accuracy": 0.88},
        "referred_det": {"acc@0.5": 0.35, "mean_iou": 0.42},
    },
}
TRAINED = {"sft": ["scene_cls", "referred_det"], "grpo_det": ["referred_det"]}


def _rows(table: str) -> dict[tuple[str, str], list[str]]:
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[0] not in ("task", "---"):
            out[(cells[0], cells[1])] = cells[2:]
    return out


def test_summary_table_marks_the_stages_that_trained_each_task_and_the_blind_baseline():
    table = report.summary_table(SUMMARIES, {}, TRAINED, {"scene_cls": 0.25})
    header = table.splitlines()[0]
    assert header == "| task | metric | blind | init | sft | grpo_det | trained by |"
    rows = _rows(table)
    # blind, init, sft, grpo_det, trained by
    assert rows[("scene_cls", "accuracy")] == ["0.250", "0.200", "0.900", "0.880", "sft"]
    # The GRPO stage trained referred_det: bold; SFT trained every task: plain.
    assert rows[("referred_det", "acc@0.5")] == ["", "0.000", "0.200", "**0.350**", "sft, grpo_det"]
    assert rows[("referred_det", "mean_iou")] == ["", "0.010", "0.300", "**0.420**", ""]
    assert "**bold**" in table and report.BLIND_NOTE in table


def test_summary_table_names_the_stages_whose_sft_anchor_kept_a_task(tmp_path):
    """An anchored task is named apart from the stages that rewarded it, and is not bold."""
    table = report.write_summary(
        tmp_path, SUMMARIES, {}, 1.0, TRAINED, anchored={"grpo_det": ["scene_cls"]}
    )
    rows = _rows(table)
    assert rows[("scene_cls", "accuracy")] == [
        "", "0.200", "0.900", "0.880", "sft; SFT anchor in grpo_det"
    ]
    assert rows[("referred_det", "acc@0.5")][-1] == "sft, grpo_det"
    assert report.ANCHOR_NOTE in table
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["anchored"] == {"grpo_det": ["scene_cls"]}
    assert report.ANCHOR_NOTE not in report.summary_table(SUMMARIES, {}, TRAINED)


def test_summary_table_without_stage_information_has_no_bold_cells():
    table = report.summary_table(SUMMARIES, {})
    assert "**" not in table
    assert _rows(table)[("scene_cls", "accuracy")] == ["", "0.200", "0.900", "0.880", ""]


def test_summary_shows_the_towers_pretraining_scores_before_and_after(tmp_path):
    scores = {
        "init_class_f1": 0.05, "class_f1": 0.43, "init_box_l1": 0.31, "box_l1": 0.058,
        "init_position_acc": 0.06, "position_acc": 0.987, "init_cover_acc": 0.2,
        "cover_acc": 1.0, "loss_classes": 0.1,
    }
    table = report.write_summary(tmp_path, SUMMARIES, {}, 1.0, TRAINED, vision_pretrain=scores)
    lines = table.splitlines()
    assert "| object classes per token, F1 | 0.050 | 0.430 |" in lines
    assert "| largest object's box, L1 (fraction of the side) | 0.310 | 0.058 |" in lines
    assert "| land cover, accuracy | 0.200 | 1.000 |" in lines
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["vision_pretrain"] == scores
    assert "Vision tower pretraining" in (tmp_path / "summary.md").read_text()
    # No pretraining: no such table.
    plain = report.write_summary(tmp_path, SUMMARIES, {}, 1.0, TRAINED)
    assert "Vision tower" not in plain
    assert json.loads((tmp_path / "summary.json").read_text())["vision_pretrain"] == {}


def test_held_out_rows_put_the_headline_first_and_add_the_reported_metrics():
    metrics = {
        "referred_det": {"acc@0.5": 0.25, "box_precision@0.5": 0.3, "mean_iou": 0.4, "n": 8},
        "vqa": {"accuracy": 0.5, "n": 8},
    }
    headline = {"referred_det": ("acc@0.5", 0.25), "vqa": ("accuracy", 0.5)}
    rows = report.held_out_rows(metrics, headline)
    assert rows == {"referred_det": {"acc@0.5": 0.25, "mean_iou": 0.4}, "vqa": {"accuracy": 0.5}}
    assert list(rows["referred_det"]) == ["acc@0.5", "mean_iou"]


def _sample(task: str, target: Target, i: int) -> Sample:
    image = Image.new("RGB", (56, 56))
    return Sample(f"s{i}", task, [image], "q", target, "", "test")


def test_majority_baseline_scores_the_most_frequent_answer_with_the_task_metric():
    labels = ["yes", "yes", "no", "yes", "no"]
    samples = [
        _sample("change_det", Target("change_det", a, (56, 56), label=a, classes=("yes", "no")), i)
        for i, a in enumerate(labels)
    ]
    counts = [2, 3, 2, 0]
    samples += [
        _sample("counting", Target("counting", str(n), (56, 56), count=n), 10 + i)
        for i, n in enumerate(counts)
    ]
    sets = [("ship",), ("ship", "plane"), ("ship",)]
    classes = ("ship", "plane", "vehicle")
    samples += [
        _sample(
            "multilabel_cls",
            Target("multilabel_cls", ", ".join(s), (56, 56), labels=s, classes=classes),
            20 + i,
        )
        for i, s in enumerate(sets)
    ]
    samples.append(
        _sample("image_caption", Target("image_caption", "a ship", (56, 56), captions=("a",)), 30)
    )
    baseline = majority_baseline(samples, "qwen25vl")
    assert set(baseline) == {"change_det", "counting", "multilabel_cls"}  # captions have none
    assert baseline["change_det"] == pytest.approx(3 / 5)
    assert baseline["counting"] == pytest.approx(2 / 4)
    # "ship" for every sample: F1 1, 2/3, 1.
    assert baseline["multilabel_cls"] == pytest.approx((1 + 2 / 3 + 1) / 3)


def test_running_mean_is_a_centred_window_that_shrinks_at_the_ends():
    rng = np.random.default_rng(0)
    values = rng.normal(size=23).tolist()
    window = 5
    expected = [np.mean(values[max(0, i - 2) : i + 3]) for i in range(len(values))]
    np.testing.assert_allclose(plots.running_mean(values, window), expected, rtol=1e-12)
    assert plots.smoothing_window(10) == 1
    assert plots.smoothing_window(300) % 2 == 1


def _records():
    rows = []
    for step in range(25):
        rows.append({"stage": "sft", "kind": "sft", "step": step, "loss": 2.0 / (step + 1),
                     "lr": 1e-3})
    for step in range(6):
        rows.append({"stage": "grpo", "kind": "grpo", "step": step, "reward": 0.1 * step,
                     "kl": float("nan") if step == 0 else 0.01 * step, "clip_ratio": 0.0})
    return rows


def test_constant_panels_are_left_out():
    rows = dict(plots.training_panels(_records()))
    assert [p[0] for p in rows["sft"]] == ["loss"]  # lr is constant
    assert [p[0] for p in rows["grpo"]] == ["reward", "kl"]  # clip ratio stays 0


def test_draw_plots_writes_both_figures(tmp_path):
    report.draw_plots(tmp_path, _records(), SUMMARIES, TRAINED, {"scene_cls": 0.25})
    for name in ("training_curves.png", "held_out.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 300 and image.size[1] > 200


def test_draw_plots_without_summaries_draws_only_the_curves(tmp_path):
    report.draw_plots(tmp_path, _records())
    assert (tmp_path / "training_curves.png").is_file()
    assert not (tmp_path / "held_out.png").exists()


def test_a_single_logged_step_is_drawn():
    rows = dict(plots.training_panels([{"stage": "g", "kind": "grpo", "step": 0, "reward": 0.5}]))
    assert [p[0] for p in rows["grpo"]] == ["reward"]


def _box_sample(prompt: str, box: list[float], i: int, task: str = "referred_det") -> Sample:
    answer = "[" + ", ".join(str(int(v)) for v in box) + "]"
    target = Target(task, answer, (112, 112), boxes=np.array([box], float), box_format="xyxy")
    return Sample(f"b{i}", task, [Image.new("RGB", (112, 112))], prompt, target, "", "test")


def test_prompt_prior_gives_each_prompt_its_best_train_box_and_unseen_prompts_the_best_overall():
    a, c = [0, 0, 10, 10], [50, 50, 60, 60]
    train = [_box_sample("A", b, i) for i, b in enumerate([a, a, c])]
    train += [_box_sample("C", c, 10 + i) for i in range(3)]
    test = [
        _box_sample("A", a, 20),  # prompt A's best train box: a (2 of its 3 targets)
        _box_sample("A", [1, 1, 11, 11], 21),  # IoU 81 / 119 with a: a hit at 0.5
        _box_sample("A", c, 22),  # a misses
        _box_sample("B", c, 23),  # no train sample asks B: the best box overall, c (4 of 6)
    ]
    assert prompt_prior_baseline(train, test, "qwen25vl") == {"referred_det": pytest.approx(0.75)}


def test_blind_baseline_is_the_majority_for_labels_and_the_prompt_prior_for_boxes():
    labels = ["yes", "yes", "no"]
    changes = [
        _sample("change_det", Target("change_det", a, (56, 56), label=a, classes=("yes", "no")), i)
        for i, a in enumerate(labels)
    ]
    caption = _sample(
        "image_caption", Target("image_caption", "a ship", (56, 56), captions=("a",)), 9
    )
    train = [_box_sample("A", [0, 0, 10, 10], 0)] + changes + [caption]
    test = [_box_sample("A", [0, 0, 10, 10], 1), _box_sample("A", [90, 90, 99, 99], 2)]
    test += changes + [caption]
    # Label tasks are no box tasks, and captions neither.
    assert set(prompt_prior_baseline(train, test, "qwen25vl")) == {"referred_det"}
    assert blind_baseline(train, test, "qwen25vl") == {
        "referred_det": pytest.approx(0.5), "change_det": pytest.approx(2 / 3)
    }


def test_prompt_prior_of_the_embedded_world_grows_with_the_objects():
    """The referring expressions say where to look; once objects fill much of the image, the
    prompt alone earns acc@0.5 (benchmarks/RESULTS.md, "A sixth look")."""
    from geovlm.data.synthetic import WorldSettings, embedded_splits

    def prior(world: WorldSettings) -> float:
        splits = embedded_splits(0, 300, 0, 100, tasks=["referred_det"], world=world)
        return prompt_prior_baseline(splits["train"], splits["test"], "qwen25vl")["referred_det"]

    standard, large = prior(WorldSettings()), prior(WorldSettings(object_scale=3, max_objects=3))
    assert standard < 0.05 < 0.1 < large
