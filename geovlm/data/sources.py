"""Train / val / test samples as a run's ``DataConfig`` names them: the embedded world or files."""

from __future__ import annotations

from collections.abc import Iterable

from geovlm.config import DataConfig
from geovlm.data.schema import Sample

SPLITS = ("train", "val", "test")


def load_splits(data: DataConfig, convention: str) -> dict[str, list[Sample]]:
    """Every split's samples; ``"embedded"`` splits come from one call to the embedded world.

    The modules of ``data.task_modules`` are imported first, so their tasks are registered in
    every process that loads data (each rank under torchrun).
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
            image_size=data.image_size,
            tasks=data.tasks,
            convention=convention,
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
                source, image_root=data.image_root, fmt=data.format, convention=convention
            )
    return out


def select_tasks(samples: list[Sample], tasks: Iterable[str] | None) -> list[Sample]:
    """The samples of ``tasks`` (all when None); an unknown task name is an error."""
    if tasks is None:
        return list(samples)
    from geovlm.tasks import registry

    wanted = set(registry.check(tasks))
    return [s for s in samples if s.task in wanted]
