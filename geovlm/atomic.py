"""Atomic folder writes: build the content in a staging folder beside the target, then rename.

``tempfile.mkdtemp`` creates its folder with mode 0700 whatever the umask, and some writers
(safetensors through ``save_pretrained``) leave their files at 0600, so a folder renamed into
place as it is would stay unreadable to every other user (a serving process, a colleague reading
a run). ``replace_dir`` first gives the staged folder and everything in it the permissions
``mkdir`` and ``open`` would (0777 / 0666 minus the umask).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask (read without changing it where Linux exposes it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def staging_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder in ``parent`` named ``<prefix>...``, with ``mkdir``'s permissions."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o777 & ~current_umask())
    return path


def default_permissions(root: Path) -> None:
    """``root`` and everything below it get the umask's folder / file permissions."""
    mask = current_umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def replace_dir(staged: Path, final: Path) -> None:
    """Move ``staged`` to ``final`` (with the umask's permissions); an older ``final`` is replaced
    without a window of none."""
    default_permissions(staged)
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        staged.rename(final)
        shutil.rmtree(old)
    else:
        staged.rename(final)
