"""No folder or module of the repository may shadow an installed package.

A test process puts the repository root on ``sys.path`` (pytest's rootdir, ``python -m``), and a
script run directly puts its own folder there. Any name importable from those folders that is
also the top-level name of an installed distribution (``kernels``, which transformers imports,
``rewards``, ``data``, ...) or of the standard library would replace the real package in that
process. This test fails as soon as a new dependency, or a new folder, brings such a clash.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"geovlm"}


def importable_names(folder: Path) -> set[str]:
    """Top-level names ``import`` finds in ``folder``: packages, namespace folders, modules."""
    names = set()
    for entry in folder.iterdir():
        if entry.name.startswith((".", "__")):
            continue
        if entry.is_dir() and entry.name.isidentifier():
            names.add(entry.name)
        elif entry.suffix == ".py" and entry.stem.isidentifier():
            names.add(entry.stem)
    return names


def installed_names() -> set[str]:
    """Top-level import names of every installed distribution and of the standard library."""
    return (set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)) - OURS


def test_no_folder_shadows_an_installed_package():
    installed = installed_names()
    folders = [ROOT, ROOT / "tests", *[p for p in (ROOT / "tests").rglob("*") if p.is_dir()]]
    clashes = {
        f"{folder.relative_to(ROOT) or '.'}/{name}": name
        for folder in folders
        if "__pycache__" not in folder.parts
        for name in importable_names(folder) & installed
    }
    assert not clashes, f"these would shadow installed packages: {clashes}"


def test_the_guard_sees_a_clash(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "json.py").write_text("")
    assert importable_names(tmp_path) == {"kernels", "json"}
    assert "json" in installed_names()
