"""The task registry (geovlm/tasks/registry.py, spec.py) and the one-place rule: no module outside
``geovlm/tasks`` lists tasks, and the lower layers import the registry only when they use it."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import geovlm
from geovlm.data.schema import Target
from geovlm.metrics import task_metrics
from geovlm.tasks import BUILTIN_MODULES, TaskSpec, registry
from tests.test_tasks import PAPER_TASKS

ROOT = Path(geovlm.__file__).resolve().parents[1]


def _spec(name: str, **fields) -> TaskSpec:
    base = dict(
        name=name,
        description="a test task",
        parse=lambda answer, target, options: answer,
        accuracy=lambda parsed, targets, options: np.ones(len(parsed)),
        metrics={"geovlm": lambda answers, targets, options: {"n_answers": len(answers)}},
        headline="n_answers",
    )
    return TaskSpec(**{**base, **fields})


@pytest.fixture
def restored():
    """Whatever a test registers is gone afterwards."""
    before = registry.specs()
    yield
    for spec in registry.specs():
        if spec not in before:
            registry.unregister(spec.name)
    assert registry.specs() == before


def test_built_in_tasks_in_the_papers_order_with_their_modules():
    assert registry.names() == PAPER_TASKS
    for spec in registry.specs():
        module = spec.parse.__module__.rsplit(".", 1)[-1]
        assert module in BUILTIN_MODULES or module.startswith("_"), (spec.name, module)
        assert spec.generate is not None and spec.from_record is not None
        assert spec.prompts and spec.description and "geovlm" in spec.metrics
    assert [registry.index(name) for name in PAPER_TASKS] == list(range(len(PAPER_TASKS)))
    assert {s.name for s in registry.specs() if s.bitemporal} == {
        "change_det",
        "change_caption",
        "temporal_cls",
    }


@pytest.mark.parametrize(
    "label, task",
    [
        ("rec", "referred_det"),
        ("Referring-Detection", "referred_det"),
        ("rotated rec", "referred_det_rot"),
        ("OD", "multi_det"),
        (" caption ", "image_caption"),
        ("identify", "region_caption"),
        ("scene_cls", "scene_cls"),
        ("segmentation", None),
    ],
)
def test_resolve_names_and_aliases(label, task):
    assert registry.resolve(label) == task


def test_geochat_tags():
    assert registry.from_tag("REFER") == "referred_det"
    assert registry.from_tag("grounding") == "grounding_desc"
    assert registry.from_tag("vqa") == "vqa"
    assert registry.from_tag("rec") is None


def test_register_unregister_and_positions(restored):
    spec = registry.register(_spec("toy", aliases=("toy_task",), tags=("toy",)))
    assert registry.register(spec) is spec  # the same object again: a no-op
    assert registry.names()[-1] == "toy" and registry.index("toy") == len(PAPER_TASKS)
    assert registry.resolve("Toy-Task") == "toy" and registry.from_tag("toy") == "toy"
    with pytest.raises(ValueError, match="already registered"):
        registry.register(_spec("toy"))
    replacement = _spec("toy", accuracy=lambda p, t, o: np.zeros(len(p)))
    assert registry.register(replacement, replace=True) is registry.get("toy")
    assert registry.index("toy") == len(PAPER_TASKS)
    assert registry.unregister("toy") is replacement
    with pytest.raises(ValueError, match="unknown task 'toy'"):
        registry.get("toy")


def test_replacing_a_built_in_keeps_its_position_and_is_undone():
    original = registry.get("counting")
    spec = dataclasses.replace(original, headline="mae")
    with registry.registered(spec, replace=True):
        assert registry.get("counting") is spec
        assert registry.names() == PAPER_TASKS
    assert registry.get("counting") is original and registry.names() == PAPER_TASKS


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(aliases=("rec",)), "alias 'rec' already names 'referred_det'"),
        (dict(aliases=("VQA",)), "alias 'VQA' already names 'vqa'"),
        (dict(tags=("Refer",)), "tag 'Refer' already selects 'referred_det'"),
        (dict(name="caption"), "'caption' is an alias of 'image_caption'"),
        (dict(aliases=("toy",)), "alias 'toy' already names 'toy'"),
    ],
)
def test_clashing_names_aliases_and_tags_are_refused(restored, fields, message):
    with pytest.raises(ValueError, match=message):
        registry.register(_spec(fields.pop("name", "toy"), **fields))
    assert registry.names() == PAPER_TASKS


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(name="Toy"), "must match"),
        (dict(name="2d"), "must match"),
        (dict(parse=None), "parse must be callable"),
        (dict(generate="no"), "generate must be callable or None"),
        (dict(metrics={"earthdial": lambda a, t, o: {}}), "'geovlm'"),
        (dict(headline=""), "headline"),
        (dict(prompts={"default": "Describe."}), r"prompts\['default'\]"),
        (dict(format_weight=-1.0), "format_weight"),
        (dict(accuracy_weight=float("nan")), "accuracy_weight"),
    ],
)
def test_bad_specs_are_clear_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        _spec(fields.pop("name", "toy"), **fields)


def test_register_takes_only_specs():
    with pytest.raises(TypeError, match="TaskSpec"):
        registry.register({"name": "toy"})


def test_import_task_modules_errors_name_the_module(restored):
    with pytest.raises(ValueError, match="'no_such.module' cannot be imported"):
        registry.import_task_modules(["no_such.module"])
    with pytest.raises(ValueError, match="'geovlm.metrics' must define SPECS"):
        registry.import_task_modules(["geovlm.metrics"])
    assert registry.import_task_modules(["geovlm.tasks.vqa"]) == [registry.get("vqa")]
    with pytest.raises(TypeError, match="list of module paths"):
        registry.import_task_modules("geovlm.tasks.vqa")
    assert registry.names() == PAPER_TASKS


def test_weights_and_protocols_come_from_the_spec(restored):
    registry.register(_spec("toy", format_weight=0.25, accuracy_weight=2.0))
    target = Target("toy", "a", (8, 8))
    from geovlm.rewards import score

    out = score("toy", ["<think>x</think><answer>a</answer>", "a"], [target] * 2)
    np.testing.assert_array_equal(out.components["format"], [1, 0])
    np.testing.assert_array_equal(out.total, [2.25, 2.0])
    assert task_metrics("toy", ["a", "b", "c"], [target] * 3) == {"n_answers": 3}
    with pytest.raises(ValueError, match="no 'earthdial' metrics; protocols: \\['geovlm'\\]"):
        task_metrics("toy", ["a"], [target], protocol="earthdial")


def test_a_task_without_generator_or_reader_is_a_clear_error(restored, tmp_path):
    from geovlm.data.readers import read_samples
    from geovlm.data.synthetic import embedded_splits

    registry.register(_spec("toy"))
    assert {s.task for s in embedded_splits(0, 1, 0, 0)["train"]} == set(PAPER_TASKS)
    with pytest.raises(ValueError, match=r"\['toy'\] have no embedded-world generator"):
        embedded_splits(0, 1, 0, 0, tasks=["toy", "vqa"])
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    data = tmp_path / "toy.jsonl"
    data.write_text(json.dumps({"image": "a.png", "problem": "?", "solution": "x"}) + "\n")
    with pytest.raises(ValueError, match="field 'task': task 'toy' cannot be read from data"):
        read_samples(data, task="toy")


# --------------------------------------------------------------------------- the one-place rule


def _string_constants(tree: ast.AST) -> list[ast.Constant]:
    """String literals of a module, docstrings left out."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_no_module_outside_geovlm_tasks_names_a_task():
    package = ROOT / "geovlm"
    tasks_dir = package / "tasks"
    found = []
    for path in sorted(package.rglob("*.py")):
        if tasks_dir in path.parents:
            continue
        for node in _string_constants(ast.parse(path.read_text(encoding="utf-8"))):
            if node.value in PAPER_TASKS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "task names outside geovlm/tasks:\n" + "\n".join(found)


def test_the_guard_sees_a_task_name():
    tree = ast.parse('"""docstring: counting"""\nX = {"counting": 1}\ndef f():\n    "vqa"\n')
    assert [n.value for n in _string_constants(tree)] == ["counting"]


def _modules_after(code: str) -> set[str]:
    """``sys.modules`` after running ``code`` in a fresh interpreter."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_lower_layers_import_neither_the_registry_nor_the_trainer():
    modules = _modules_after(
        "import geovlm.data.schema, geovlm.data.readers, geovlm.data.synthetic\n"
        "import geovlm.rewards.batch, geovlm.rewards.accuracy, geovlm.rewards.format\n"
        "import geovlm.rewards.semantic, geovlm.metrics"
    )
    higher = {"geovlm.tasks", "geovlm.model", "geovlm.train", "geovlm.grpo", "geovlm.sft"}
    assert not modules & higher, modules & higher
    assert "transformers" not in modules


def test_config_imports_the_reward_options_without_numba():
    modules = _modules_after("import geovlm.config")
    assert "geovlm.rewards.options" in modules
    assert "numba" not in modules and "geovlm.tasks" not in modules


@pytest.mark.parametrize(
    "code",
    [
        "from geovlm.data.schema import Target\nTarget('counting', '3', (8, 8), count=3)",
        "from geovlm.rewards import score\n"
        "from geovlm.data.schema import Target\n"
        "t = Target('vqa', 'yes', (8, 8), label='yes')\n"
        "assert score('vqa', ['<think>a</think><answer>yes</answer>'], [t]).total[0] == 2",
        "from geovlm.data.synthetic import generate_scenes, samples_from_scene\n"
        "assert len(samples_from_scene(generate_scenes(0, 1)[0])) == 13",
        "import geovlm.tasks.grounding_desc",
    ],
)
def test_every_entry_point_loads_the_registry_without_a_cycle(code):
    assert "geovlm.tasks.temporal_cls" in _modules_after(code)


def test_a_run_config_registers_its_task_modules_before_checking_task_names(restored):
    from geovlm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.tasks: unknown task"):
        load_config(None, ["data.tasks=[largest_color]"])
    with pytest.raises(ConfigError, match="data.task_modules: task module 'no_such.mod'"):
        load_config(None, ["data.task_modules=[no_such.mod]"])
    module = "tests.test_tasks.test_register_task"
    cfg = load_config(None, [f"data.task_modules=[{module}]", "stages.sft.tasks=[largest_color]",
                             "stages.sft.task_weights={}"])
    assert cfg.data.task_modules == [module] and registry.names()[-1] == "largest_color"
