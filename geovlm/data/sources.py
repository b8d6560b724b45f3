"""Train / val / test samples as a run's ``DataConfig`` names them: the embedded world or files."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from geovlm.config import DataConfig, ModelConfig, embedded_world
from geovlm.data.schema import Sample

SPLITS = ("train", "val", "test")


def model_pixel_budget(model: ModelConfig) -> tuple[int | None, int | None]:
    """``(min_pixels, max_pixels)`` of the processor the run's model will have: the tiny model's
    ``model.tiny`` budget, or the one saved with ``model.path``'s processor (``None`` where it
    saves none: the processor's default). The one place a run computes it before the model is
    built, so that Qwen2.5-VL boxes in SFT targets, rewards and evaluation share one frame
    (those read the built processor's, ``geovlm.data.collate.pixel_budget``, which is this)."""
    if model.path is None:
        return model.tiny.min_pixels, model.tiny.max_pixels
    from geovlm.data.boxes import saved_pixel_budget

    return saved_pixel_budget(model.path)


def load_splits(
    data: DataConfig, convention: str, pixel_budget: tuple[int | None, int | None] = (None, None)
) -> dict[str, list[Sample]]:
    """Every split's samples; ``"embedded"`` splits come from one call to the embedded world.

    Boxes are rendered in the model's ``convention`` with the processor's ``pixel_budget``
    (``model_pixel_budget``). The modules of ``data.task_modules`` are imported first, so their
    tasks are registered in every process that loads data (each rank under torchrun).
    """
    from geovlm.tasks import registry

    registry.import_task_modules(data.task_modules)
    out: dict[str, list[Sample]] = {}
    if any(getattr(data, split) == "embedded" for split in SPLITS):
        from geovlm.data.synthetic import embedded_splits

        world = embedded_splits(
            seed=data.seed,
            n_train=data.n_train_scenes,
            n_val=data.n_val_scenes,
            n_test=data.n_test_scenes,
            n_test_by_task=test_scenes_by_task(data.n_test_scenes_by_task, data.tasks),
            image_size=data.image_size,
            tasks=data.tasks,
            convention=convention,
            min_pixels=pixel_budget[0],
            max_pixels=pixel_budget[1],
            world=embedded_world(data),
        )
    for split in SPLITS:
        source = getattr(data, split)
        if source is None:
            out[split] = []
        elif source == "embedded":
            out[split] = world[split]
        else:
            from geovlm.data.readers import read_samples

            out[split] = read_samples(
                source,
                image_root=data.image_root,
                fmt=data.format,
                convention=convention,
                source_convention=data.source_convention,
                min_pixels=pixel_budget[0],
                max_pixels=pixel_budget[1],
                box_layout=data.box_layout,
            )
    return out


def test_scenes_by_task(
    by_task: Mapping[str, int], tasks: Iterable[str] | None
) -> dict[str, int]:
    """``data.n_test_scenes_by_task`` narrowed to the run's ``tasks`` (all when None): a preset
    that gives detection more test scenes still runs with ``data.tasks`` without it."""
    if tasks is None:
        return dict(by_task)
    wanted = set(tasks)
    return {t: n for t, n in by_task.items() if t in wanted}


def weigh_tasks(samples: list[Sample], weights: Mapping[str, int]) -> list[Sample]:
    """``samples`` with each sample of a task in ``weights`` repeated that many times (in place,
    order kept): its task's share of a stage's batches grows by that factor, nothing is lost."""
    bad = {task: w for task, w in weights.items() if not isinstance(w, int) or w < 1}
    if bad:
        raise ValueError(f"task weights must be ints >= 1, got {bad}")
    return [s for s in samples for _ in range(weights.get(s.task, 1))]


def select_tasks(samples: list[Sample], tasks: Iterable[str] | None) -> list[Sample]:
    """The samples of ``tasks`` (all when None); an unknown task name is an error."""
    if tasks is None:
        return list(samples)
    from geovlm.tasks import registry

    wanted = set(registry.check(tasks))
    return [s for s in samples if s.task in wanted]
