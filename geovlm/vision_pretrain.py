"""Dense pretraining of the embedded tiny model's vision tower on the synthetic world's geometry.

A real Qwen2.5-VL starts from a pretrained vision transformer; the embedded tiny model's tower
starts at random, and next-token loss alone does not teach it to see the objects: after the
default SFT a linear probe of its merged tokens predicts a scene's object count with R^2 ~0, and
one component shared by every token makes up ~95 % of each token's norm (benchmarks/RESULTS.md).
Trained on per-token targets the same tower learns them within a minute. So the builder of the
embedded model (``geovlm.model.initial_policy``) pretrains the tower first, on the images of the
train split's scene stream (never val or test) and their exact geometry.

Targets of each merged image token (one 2x2 group of 14 px patches, a 28x28 px cell of the
image) and of each image:

* ``classes``  ``[N, T, C]``  multi-hot: the classes of the objects whose centre is in the cell;
* ``colors``   ``[N, T, K]``  multi-hot: their colour names;
* ``boxes``    ``[N, T, 4]``  the largest such object's ``x1, y1, x2, y2`` over the image size
  (``box_mask`` ``[N, T]`` says where one exists);
* ``rows``, ``cols`` ``[N, T]``  the cell's own row and column: the language model sees image
  positions only through M-RoPE, whose width frequencies barely turn across a 4-token row;
* ``cover``    ``[N]``  the land cover (on the mean of the image's tokens).

Afterwards ``center_merger_output`` re-centres and rescales the tokens through the merger's last
Linear (an exact affine change of existing weights; the architecture stays Qwen2.5-VL's): zero
mean and unit mean norm over the pretraining images, so that the information, not the shared
component, is what the language model's RMSNorm passes on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from geovlm.data.scenes import LAND_COVERS, OBJECT_CLASSES, OBJECT_COLORS, Scene, SceneState

logger = logging.getLogger(__name__)

COLOR_NAMES: tuple[str, ...] = tuple(
    sorted({name for colors in OBJECT_COLORS.values() for name in colors})
)
# The head's output columns, in order.
_SPLITS = (len(OBJECT_CLASSES), len(COLOR_NAMES), 4, len(LAND_COVERS))


@dataclass
class DenseTargets:
    """Per-token and per-image targets of ``N`` images with a ``rows x cols`` token grid."""

    classes: torch.Tensor
    colors: torch.Tensor
    boxes: torch.Tensor
    box_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    cover: torch.Tensor
    grid: tuple[int, int]

    def __getitem__(self, index: torch.Tensor) -> DenseTargets:
        return DenseTargets(
            self.classes[index],
            self.colors[index],
            self.boxes[index],
            self.box_mask[index],
            self.rows[index],
            self.cols[index],
            self.cover[index],
            self.grid,
        )


def dense_targets(states: Sequence[SceneState], grid: tuple[int, int]) -> DenseTargets:
    """Targets of ``states`` (images of one size) on a ``grid = (rows, cols)`` of merged tokens."""
    n_rows, n_cols = grid
    n, t = len(states), n_rows * n_cols
    classes = torch.zeros(n, t, len(OBJECT_CLASSES))
    colors = torch.zeros(n, t, len(COLOR_NAMES))
    boxes = torch.zeros(n, t, 4)
    box_mask = torch.zeros(n, t)
    cover = torch.zeros(n, dtype=torch.long)
    for i, state in enumerate(states):
        width, height = state.image.size
        cell_w, cell_h = width / n_cols, height / n_rows
        cover[i] = LAND_COVERS.index(state.land_cover)
        # Largest first, so that the box of a cell is its largest object's.
        for obj in sorted(state.objects, key=lambda o: -o.area):
            row = min(int(obj.cy // cell_h), n_rows - 1)
            col = min(int(obj.cx // cell_w), n_cols - 1)
            token = row * n_cols + col
            classes[i, token, OBJECT_CLASSES.index(obj.category)] = 1.0
            colors[i, token, COLOR_NAMES.index(obj.color)] = 1.0
            if not box_mask[i, token]:
                x1, y1, x2, y2 = obj.xyxy
                boxes[i, token] = torch.tensor([x1 / width, y1 / height, x2 / width, y2 / height])
                box_mask[i, token] = 1.0
    index = torch.arange(t)
    return DenseTargets(
        classes,
        colors,
        boxes,
        box_mask,
        (index // n_cols).expand(n, t),
        (index % n_cols).expand(n, t),
        cover,
        grid,
    )


class _DenseHead(torch.nn.Module):
    """Linear read-outs of the merged tokens ``[N, T, H]`` (dropped after pretraining)."""

    def __init__(self, hidden: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.linear = torch.nn.Linear(hidden, sum(_SPLITS) + grid[0] + grid[1])

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.linear(tokens)
        classes, colors, boxes, cover, position = out.split(
            [*_SPLITS, self.grid[0] + self.grid[1]], dim=-1
        )
        rows, cols = position.split(list(self.grid), dim=-1)
        return classes, colors, boxes, cover.mean(1), rows, cols


def _box_l1(boxes: torch.Tensor, y: DenseTargets) -> torch.Tensor:
    """Mean L1 of the predicted boxes over the tokens that hold one (fractions of the side)."""
    per_token = (boxes - y.boxes).abs().mean(-1)
    return (per_token * y.box_mask).sum() / y.box_mask.sum().clamp(min=1.0)


def _losses(head: _DenseHead, tokens: torch.Tensor, y: DenseTargets) -> dict[str, torch.Tensor]:
    classes, colors, boxes, cover, rows, cols = head(tokens)
    return {
        "classes": F.binary_cross_entropy_with_logits(classes, y.classes),
        "colors": F.binary_cross_entropy_with_logits(colors, y.colors),
        "boxes": _box_l1(boxes, y),
        "cover": F.cross_entropy(cover, y.cover),
        "position": F.cross_entropy(rows.flatten(0, 1), y.rows.flatten())
        + F.cross_entropy(cols.flatten(0, 1), y.cols.flatten()),
    }


def _scores(head: _DenseHead, tokens: torch.Tensor, y: DenseTargets) -> dict[str, float]:
    """Held-out read-out quality: token-level class F1, box L1 (fraction of the image side),
    token position accuracy, land-cover accuracy."""
    classes, _, boxes, cover, rows, cols = head(tokens)
    predicted, true = classes > 0, y.classes > 0
    tp = (predicted & true).sum().item()
    f1 = 2 * tp / max(predicted.sum().item() + true.sum().item(), 1)
    position = ((rows.argmax(-1) == y.rows) & (cols.argmax(-1) == y.cols)).float().mean()
    return {
        "class_f1": round(f1, 4),
        "box_l1": round(float(_box_l1(boxes, y)), 4),
        "position_acc": round(float(position), 4),
        "cover_acc": round(float((cover.argmax(-1) == y.cover).float().mean()), 4),
    }


class _Images:
    """``pixel_values`` / ``image_grid_thw`` of equally sized images, sliced per image."""

    def __init__(self, processor, images: Sequence):
        encoded = processor.image_processor(images=list(images), return_tensors="pt")
        self.grid_thw = encoded["image_grid_thw"]
        if not bool((self.grid_thw == self.grid_thw[0]).all()):
            raise ValueError("vision pretraining needs images of one size")
        per_image = int(self.grid_thw[0].prod())
        self.pixels = encoded["pixel_values"].reshape(len(images), per_image, -1)
        merge = processor.image_processor.merge_size
        self.grid = (int(self.grid_thw[0, 1]) // merge, int(self.grid_thw[0, 2]) // merge)

    def __len__(self) -> int:
        return len(self.pixels)

    def tokens(self, visual: torch.nn.Module, index: torch.Tensor) -> torch.Tensor:
        """Merged tokens ``[len(index), rows * cols, H]`` of the images at ``index``."""
        device = next(visual.parameters()).device
        dtype = next(visual.parameters()).dtype
        pixels = self.pixels[index].flatten(0, 1).to(device, dtype)
        out = visual(pixels, grid_thw=self.grid_thw[index].to(device))
        out = getattr(out, "pooler_output", out)  # transformers returns an output object
        return out.reshape(len(index), self.grid[0] * self.grid[1], -1)


def _states(scenes: Sequence[Scene]) -> list[SceneState]:
    return [state for scene in scenes for state in (scene.before, scene.after)]


@torch.no_grad()
def center_merger_output(visual: torch.nn.Module, images: _Images, batch_size: int = 64) -> None:
    """Shift and scale the merger's last Linear so that the merged tokens of ``images`` have zero
    mean and a mean norm of 1 (an exact affine change of the output)."""
    tokens = torch.cat([
        images.tokens(visual, torch.arange(start, min(start + batch_size, len(images))))
        .flatten(0, 1)
        .double()
        for start in range(0, len(images), batch_size)
    ])
    mean = tokens.mean(0)
    scale = 1.0 / (tokens - mean).norm(dim=-1).mean()
    last = visual.merger.mlp[-1]
    last.bias.sub_(mean.to(last.bias.dtype)).mul_(scale.to(last.bias.dtype))
    last.weight.mul_(scale.to(last.weight.dtype))


def pretrain_vision_tower(
    model: torch.nn.Module,
    processor,
    train_scenes: Sequence[Scene],
    eval_scenes: Sequence[Scene],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> dict[str, float]:
    """Pretrain ``model``'s vision tower in place on the dense targets of ``train_scenes`` (both
    images of each), re-centre its output, and return the read-out scores on ``eval_scenes``
    before and after (``init_*`` and plain keys) plus the final training losses."""
    if steps <= 0:
        raise ValueError(f"vision pretraining needs steps > 0, got {steps}")
    if not train_scenes or not eval_scenes:
        raise ValueError("vision pretraining needs train and eval scenes")
    visual = model.model.visual
    train = _Images(processor, [s.image for s in _states(train_scenes)])
    held_out = _Images(processor, [s.image for s in _states(eval_scenes)])
    y_train = dense_targets(_states(train_scenes), train.grid)
    y_eval = dense_targets(_states(eval_scenes), held_out.grid)
    hidden = visual.merger.mlp[-1].out_features
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = _DenseHead(hidden, train.grid).to(next(visual.parameters()).device)
    was_training = visual.training
    visual.train()
    trainable = [p for p in visual.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("vision pretraining needs a trainable vision tower")
    optimizer = torch.optim.AdamW([*trainable, *head.parameters()], lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, cosine to 10 %
        return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    all_eval = torch.arange(len(held_out))

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            return _scores(head, held_out.tokens(visual, all_eval).float(), y_eval)

    scores = {f"init_{k}": v for k, v in evaluate().items()}
    bar = tqdm(range(steps), desc="vision pretraining", disable=not progress, leave=False)
    losses: dict[str, torch.Tensor] = {}
    for _ in bar:
        index = torch.randint(0, len(train), (batch_size,), generator=generator)
        losses = _losses(head, train.tokens(visual, index).float(), y_train[index])
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    scores.update(evaluate())
    scores.update({f"loss_{k}": round(v.item(), 4) for k, v in losses.items()})
    center_merger_output(visual, train)
    visual.train(was_training)
    optimizer.zero_grad(set_to_none=True)
    logger.info("vision tower pretrained for %d steps: %s", steps, scores)
    return scores
