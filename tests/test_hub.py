"""``model.path`` as a Hugging Face hub id, offline: the local HF cache, or a clear error.

The cache is a folder built here in the hub's layout (``models--org--name/snapshots/<rev>/``
with ``refs/main``) and selected with ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` forbids the
network. Both are read when huggingface_hub is imported, so the checks run in a fresh
interpreter (``_hub_probe``), as a user's process would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from geovlm.model import resolve_model_source, save_pretrained
from tests.test_model import tiny_policy

ROOT = Path(__file__).resolve().parents[1]
REPO = "geovlm-test/tiny-qwen25vl"
REVISION = "0123456789abcdef0123456789abcdef01234567"

PROBE = r"""
import json, sys
import torch
from geovlm.model import build_policy
from geovlm.train import main

out = {}
model, processor = build_policy(path=sys.argv[1])
out["checksum"] = float(sum(p.detach().double().sum() for p in model.parameters()))
out["name"] = model.name_or_path
out["vocab"] = len(processor.tokenizer)
out["missing_code"] = main(["output_dir=" + sys.argv[2], "name=missing",
                            "model.path=geovlm-test/not-cached", "stages=[]"])
print("PROBE " + json.dumps(out))
"""


def hub_cache(root: Path, model, processor) -> Path:
    """A hub cache holding ``model`` as ``REPO`` at ``REVISION``."""
    repo = root / ("models--" + REPO.replace("/", "--"))
    save_pretrained(model, processor, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return root


def test_a_hub_id_loads_from_the_cache_offline_and_a_missing_one_says_how_to_fix(tmp_path):
    model, processor = tiny_policy(seed=3)
    cache = hub_cache(tmp_path / "hub", model, processor)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, REPO, str(tmp_path / "runs")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("PROBE "))
    out = json.loads(line.removeprefix("PROBE "))
    want = float(sum(p.detach().double().sum() for p in model.parameters()))
    assert out["checksum"] == pytest.approx(want, rel=1e-12)
    assert out["name"] == REPO and out["vocab"] == len(processor.tokenizer)
    # The missing model: which id, where it looked, why it did not download, what to do.
    assert out["missing_code"] == 2
    err = result.stderr
    assert "model.path=geovlm-test/not-cached" in err and str(cache) in err
    assert "HF_HUB_OFFLINE=1" in err and "hf download geovlm-test/not-cached" in err
    assert "local folder" in err


@pytest.mark.parametrize(
    "path, message",
    [("/no/such/folder/Qwen2.5-VL-3B", "no such folder"), ("./relative/missing", "no such folder")],
)
def test_a_missing_folder_is_not_taken_for_a_hub_id(path, message):
    with pytest.raises(FileNotFoundError, match=message):
        resolve_model_source(path)


def test_a_folder_without_a_model_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        resolve_model_source(tmp_path)
