"""Checkpoints are atomic and readable by other users (the umask, not mkdtemp's 0700, decides)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from geovlm.atomic import current_umask, replace_dir, staging_dir
from geovlm.checkpoint import latest_checkpoint, save_checkpoint
from geovlm.config import load_config
from tests.test_model import tiny_policy


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    os.umask(old)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_staging_dir_follows_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    staged = staging_dir(tmp_path, ".x-")
    assert mode(staged) == 0o777 & ~mask
    (staged / "a").write_text("1")
    replace_dir(staged, tmp_path / "final")
    assert mode(tmp_path / "final") == 0o777 & ~mask
    assert (tmp_path / "final" / "a").read_text() == "1"


def test_replace_dir_swaps_an_existing_folder(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "old").write_text("old")
    staged = staging_dir(tmp_path, ".x-")
    (staged / "new").write_text("new")
    replace_dir(staged, tmp_path / "final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert [p.name for p in (tmp_path / "final").iterdir()] == ["new"]


def test_checkpoint_is_readable_by_others(tmp_path, umask):
    umask(0o022)
    model, processor = tiny_policy()
    directory = save_checkpoint(
        tmp_path / "stage" / "checkpoint-3", model, processor, load_config(), step=3
    )
    assert mode(directory) == 0o755
    for path in directory.rglob("*"):
        assert mode(path) & 0o044 == 0o044, path
    assert latest_checkpoint(tmp_path / "stage") == directory
    assert not [p for p in (tmp_path / "stage").iterdir() if p.name.startswith(".")]
