"""A run folder belongs to one config: rerunning resumes it, a different config is refused.

``runs/<name>/config.yaml`` records the resolved config the folder's checkpoints were trained
with. Rerunning the same command resumes (finished stages are skipped, a running one continues
from its last checkpoint). Rerunning under the same name with a *different* config would reuse
checkpoints that the new config does not describe, so it stops with the differing keys unless
the caller says what it wants:

- ``"resume"`` (the default): resume only an identical config; refuse anything else;
- ``"overwrite"``: delete the folder and start again;
- ``"resume-changed"``: keep the checkpoints and continue under the new config (finished
  stages stay as they were); the earlier config is kept as ``config.<n>.yaml`` beside it.

Keys that do not change what is trained or how it is evaluated (``RESUMABLE_KEYS``: the run's
name and folder, profiling, thread counts, the evaluation batch size, trackers, and how the work
is spread over processes: a run started under torchrun may be resumed in one process and vice
versa) may differ freely.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import yaml

from geovlm.config import ConfigError, RunConfig, save_config

ExistingRun = Literal["resume", "overwrite", "resume-changed"]
EXISTING_RUN_CHOICES: tuple[str, ...] = ("resume", "overwrite", "resume-changed")
CONFIG_FILE = "config.yaml"

# Dotted keys whose value never changes the trained weights or the held-out numbers.
RESUMABLE_KEYS = frozenset(
    {
        "name",
        "output_dir",
        "profile",
        "threads",
        "eval.batch_size",
        "report_to",
        "distributed.strategy",
        "distributed.deepspeed",
        "distributed.backend",
        "data.workers",
    }
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "s": [{"n": 2}]}`` -> ``{"a.b": 1, "s.0.n": 2}`` (leaves only)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        out = {}
        for index, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}{index}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` of every leaf that differs, resumable keys left out.

    A key present on one side only shows ``"<absent>"`` on the other.
    """
    old, new = flatten(saved), flatten(current)
    missing = "<absent>"
    out = []
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_KEYS:
            continue
        before, after = old.get(key, missing), new.get(key, missing)
        if before != after:
            out.append((key, before, after))
    return out


def _read_saved(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the run's saved config ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the run's saved config is not a mapping")
    return data


def _refusal(run_dir: Path, differences: list[tuple[str, Any, Any]]) -> str:
    shown = differences[:20]
    lines = [f"  {key}: {before!r} (saved) -> {after!r} (now)" for key, before, after in shown]
    if len(differences) > len(shown):
        lines.append(f"  ... and {len(differences) - len(shown)} more")
    return (
        f"run folder {run_dir} was made by a different config; its checkpoints do not describe "
        "this one:\n" + "\n".join(lines) + "\n"
        "To keep both, give this run another name (name=<new name>). To start again in this "
        "folder, add --existing-run overwrite (deletes it). To continue its checkpoints under "
        "the new config anyway, add --existing-run resume-changed."
    )


def prepare_run_dir(config: RunConfig, existing: ExistingRun = "resume") -> str:
    """Check ``config.run_dir`` against ``config`` and save the config there.

    Returns what happened: ``"new"``, ``"resumed"``, ``"overwritten"`` or ``"resumed-changed"``.
    Raises ``ConfigError`` (with the differing keys and the ways forward) when the folder holds a
    run of another config and ``existing`` is ``"resume"``, or holds files but no config.
    Under torchrun only rank 0 calls it (``geovlm.train`` shares the outcome with the others).
    """
    if existing not in EXISTING_RUN_CHOICES:
        raise ConfigError(f"existing run: {existing!r} is not one of {EXISTING_RUN_CHOICES}")
    run_dir = config.run_dir
    saved_path = run_dir / CONFIG_FILE
    status = "new"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if existing == "overwrite":
            shutil.rmtree(run_dir)
            status = "overwritten"
        elif not saved_path.is_file():
            raise ConfigError(
                f"run folder {run_dir} is not empty but has no {CONFIG_FILE}: it is not a "
                "geovlm run (or an interrupted copy of one). Choose another name=, or add "
                "--existing-run overwrite to delete it."
            )
        else:
            differences = config_differences(_read_saved(saved_path), config.to_dict())
            if not differences:
                status = "resumed"
            elif existing == "resume":
                raise ConfigError(_refusal(run_dir, differences))
            else:
                status = "resumed-changed"
                index = 1
                while (run_dir / f"config.{index}.yaml").exists():
                    index += 1
                saved_path.rename(run_dir / f"config.{index}.yaml")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, saved_path)
    return status
