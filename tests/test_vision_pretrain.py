"""geovlm.vision_pretrain: dense targets from the world's geometry, the exact re-centring of the
merged tokens, and a short pretraining that learns what it is asked (the token positions first).

Oracles: the scenes' own objects recomputed here cell by cell, the merger's output before the
re-centring (affine map checked in float64), and chance levels of the read-outs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from geovlm.config import ConfigError, load_config
from geovlm.data.scenes import LAND_COVERS, OBJECT_CLASSES, generate_scenes
from geovlm.model import VISION_PRETRAIN_FILE, initial_policy, save_pretrained
from geovlm.vision_pretrain import (
    COLOR_NAMES,
    _Images,
    center_merger_output,
    dense_targets,
    pretrain_vision_tower,
)
from tests.test_model import tiny_policy


def _states(scenes):
    return [state for scene in scenes for state in (scene.before, scene.after)]


def test_dense_targets_mark_each_object_in_the_cell_of_its_centre():
    states = _states(generate_scenes(7, 12, 112))
    y = dense_targets(states, (4, 4))
    assert y.classes.shape == (24, 16, len(OBJECT_CLASSES))
    assert y.colors.shape == (24, 16, len(COLOR_NAMES))
    for i, state in enumerate(states):
        assert LAND_COVERS[y.cover[i]] == state.land_cover
        cells: dict[int, list] = {}
        for obj in state.objects:
            token = min(int(obj.cy // 28), 3) * 4 + min(int(obj.cx // 28), 3)
            cells.setdefault(token, []).append(obj)
            assert y.classes[i, token, OBJECT_CLASSES.index(obj.category)] == 1
            assert y.colors[i, token, COLOR_NAMES.index(obj.color)] == 1
        # Nothing is marked where no object is centred, and each cell holds its largest box.
        marked = {(t, o.category) for t, objs in cells.items() for o in objs}
        assert int(y.classes[i].sum()) == len(marked)
        assert set(torch.nonzero(y.box_mask[i]).flatten().tolist()) == set(cells)
        for token, objs in cells.items():
            largest = max(objs, key=lambda o: o.area)
            expected = torch.tensor(largest.xyxy, dtype=torch.float32) / 112
            torch.testing.assert_close(y.boxes[i, token], expected)
    assert y.rows[0].tolist() == [r for r in range(4) for _ in range(4)]
    assert y.cols[0].tolist() == [c for _ in range(4) for c in range(4)]


def test_dense_targets_follow_a_non_square_grid():
    states = _states(generate_scenes(3, 4, (168, 112)))
    y = dense_targets(states, (4, 6))
    for i, state in enumerate(states):
        for obj in state.objects:
            token = min(int(obj.cy // 28), 3) * 6 + min(int(obj.cx // 28), 5)
            assert y.classes[i, token, OBJECT_CLASSES.index(obj.category)] == 1
    assert y.cols.max() == 5 and y.rows.max() == 3


def test_center_merger_output_is_an_exact_affine_map_to_zero_mean_unit_norm():
    model, processor = tiny_policy(seed=1)
    model.eval()
    images = _Images(processor, [s.image for s in _states(generate_scenes(2, 6, 112))])
    index = torch.arange(len(images))
    with torch.no_grad():
        before = images.tokens(model.model.visual, index).flatten(0, 1).double()
    center_merger_output(model.model.visual, images, batch_size=5)
    with torch.no_grad():
        after = images.tokens(model.model.visual, index).flatten(0, 1).double()
    mean = before.mean(0)
    scale = 1 / (before - mean).norm(dim=-1).mean()
    torch.testing.assert_close(after, (before - mean) * scale, atol=1e-5, rtol=1e-4)
    assert after.mean(0).norm() < 1e-4
    assert after.norm(dim=-1).mean() == pytest.approx(1.0, abs=1e-4)


def test_a_short_pretraining_learns_the_read_outs_and_only_touches_the_tower():
    model, processor = tiny_policy(seed=2)
    model.eval()
    before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    scores = pretrain_vision_tower(
        model,
        processor,
        generate_scenes(0, 16, 112),
        generate_scenes(1, 4, 112),
        steps=100,
        lr=3e-3,
        batch_size=8,
        seed=0,
        progress=False,
    )
    # On unseen scenes: the boxes come closer, the land cover is read (5 covers: chance 0.2);
    # the token positions (a harder, slower target) are at least being learnt on the train side.
    assert scores["box_l1"] < 0.7 * scores["init_box_l1"]
    assert scores["cover_acc"] >= 0.5 > scores["init_cover_acc"]
    assert scores["loss_position"] < 0.9 * 2 * math.log(4)
    assert not model.model.visual.training
    # Only the vision tower trains; the language model is untouched.
    for key, value in model.model.language_model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_pretraining_needs_steps_and_scenes():
    model, processor = tiny_policy(seed=3)
    scenes = generate_scenes(0, 2, 112)
    kwargs = dict(steps=1, lr=1e-3, batch_size=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="steps > 0"):
        pretrain_vision_tower(model, processor, scenes, scenes, **{**kwargs, "steps": 0})
    with pytest.raises(ValueError, match="train and eval scenes"):
        pretrain_vision_tower(model, processor, [], scenes, **kwargs)


def test_initial_policy_pretrains_the_embedded_tower_and_keeps_it_frozen_when_asked(tmp_path):
    overrides = [
        f"output_dir={tmp_path}",
        "name=pre",
        "data.n_train_scenes=8",
        "model.tiny.vocab_size=500",
        "model.tiny.num_hidden_layers=1",
        "model.vision_pretrain.steps=3",
        "model.vision_pretrain.batch_size=4",
        "model.freeze_vision=true",
    ]
    config = load_config("tiny-cpu", overrides)
    corpus = ["a vehicle at the top left of the image", "no change"] * 50
    (model, _), init_dir = initial_policy(config, corpus, torch.device("cpu"))
    scores = json.loads((init_dir / VISION_PRETRAIN_FILE).read_text())
    assert {"class_f1", "box_l1", "position_acc", "cover_acc", "init_class_f1"} <= set(scores)
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    # The saved init/ carries the pretrained tower: the same weights as the built one.
    plain = load_config("tiny-cpu", [*overrides, "name=plain", "model.vision_pretrain.steps=0"])
    (unpretrained, _), _ = initial_policy(plain, corpus, torch.device("cpu"))
    (reloaded, _), _ = initial_policy(config, corpus, torch.device("cpu"))
    built, plain_tower, again = (m.model.visual for m in (model, unpretrained, reloaded))
    for (name, p), r in zip(built.named_parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(r, p, rtol=0, atol=0, msg=name)
    pairs = zip(built.parameters(), plain_tower.parameters(), strict=True)
    assert any(not torch.equal(p, q) for p, q in pairs)


def test_vision_pretraining_refuses_bad_values_and_leaves_a_checkpoint_alone(tmp_path):
    # A saved tiny model loads as it is, whatever the preset says about pretraining.
    model, processor = tiny_policy(seed=4)
    save_pretrained(model, processor, tmp_path / "ckpt")
    config = load_config(
        "tiny-cpu", [f"model.path={tmp_path / 'ckpt'}", "model.vision_pretrain.steps=10"]
    )
    (loaded, _), source = initial_policy(config, [], torch.device("cpu"))
    assert source == tmp_path / "ckpt" and not (source / VISION_PRETRAIN_FILE).exists()
    for p, q in zip(loaded.model.visual.parameters(), model.model.visual.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="model.vision_pretrain"):
        load_config("tiny-cpu", ["model.vision_pretrain.steps=-1"])
    with pytest.raises(ConfigError, match="model.vision_pretrain"):
        load_config("tiny-cpu", ["model.vision_pretrain.lr=0"])
