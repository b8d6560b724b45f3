"""``geovlm.eval``: resumable predictions, the report, sharded evaluation, and the CLI."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from geovlm import eval as E
from geovlm.metrics import task_metrics
from geovlm.rewards import RewardOptions, score
from tests.fixtures_eval import HERE, samples

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class CountingGenerator:
    """A deterministic fake model: answers from a table, counting the samples it is asked for."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, batch):
        self.calls.append([s.id for s in batch])
        return [self.answers[s.id] for s in batch]

    @property
    def generated(self) -> list[str]:
        return [i for call in self.calls for i in call]


def _fixture():
    cls, cls_pred = samples("classification")
    det, det_pred = samples("detection")
    return cls + det, {**cls_pred, **det_pred}


# --------------------------------------------------------------------------- evaluate


def test_evaluate_scores_predictions_like_metrics_and_rewards(tmp_path):
    items, predictions = _fixture()
    fake = CountingGenerator(predictions)
    path = tmp_path / "predictions.jsonl"
    report = E.evaluate(None, None, items, batch_size=4, predictions_path=path, generate_fn=fake)
    assert sorted(fake.generated) == sorted(s.id for s in items)
    assert all(len(call) <= 4 for call in fake.calls)
    stored = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["id"]: r["prediction"] for r in stored} == predictions
    for task in {s.task for s in items}:
        mine = [s for s in items if s.task == task]
        texts = [predictions[s.id] for s in mine]
        targets = [s.target for s in mine]
        expected = task_metrics(task, texts, targets, prompts=[s.prompt for s in mine])
        options = RewardOptions(convention="qwen25vl", use_embeddings=False)
        rewards = score(task, texts, targets, options=options, prompts=[s.prompt for s in mine])
        got = report.metrics[task]
        assert got["n"] == len(mine)
        assert {k: got[k] for k in expected} == pytest.approx(expected)
        assert got["reward"] == pytest.approx(np.mean(rewards.total))
        assert got["reward/accuracy"] == pytest.approx(np.mean(rewards.components["accuracy"]))
        assert got["reward/format"] == pytest.approx(np.mean(rewards.components["format"]))
    # The hand-computed fixture values come through unchanged.
    assert report.metrics["scene_cls"]["accuracy"] == 0.5
    assert report.metrics["referred_det"]["acc@0.5"] == pytest.approx(0.375)


def test_resume_skips_done_items_and_reuses_their_predictions(tmp_path):
    items, predictions = _fixture()
    path = tmp_path / "predictions.jsonl"
    first = items[:7]
    E.evaluate(None, None, first, batch_size=3, predictions_path=path,
               generate_fn=CountingGenerator(predictions))
    # A run killed mid-write leaves a truncated line; it must not count as done.
    with path.open("a") as handle:
        handle.write('{"id": "' + items[7].id + '", "task": "')
    # The stored answers win over what the model would say now.
    changed = {k: "<answer>nonsense</answer>" for k in predictions}
    fake = CountingGenerator(changed)
    report = E.evaluate(None, None, items, batch_size=5, predictions_path=path, generate_fn=fake)
    assert sorted(fake.generated) == sorted(s.id for s in items[7:])
    assert report.metrics["scene_cls"]["accuracy"] == 0.5  # the 4 scene_cls items were done
    records = E.read_predictions(path)
    assert set(records) == {s.id for s in items}
    assert all(records[s.id]["prediction"] == predictions[s.id] for s in first)
    again = CountingGenerator(changed)
    E.evaluate(None, None, items, predictions_path=path, generate_fn=again)
    assert again.calls == []


def test_predictions_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "task": "vqa", "prediction": "yes"}\nnot json\n'
                    '{"id": "b", "task": "vqa", "prediction": "no"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: not a JSON object"):
        E.read_predictions(path)
    path.write_text('{"id": "a", "task": "vqa"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:1: field 'prediction'"):
        E.read_predictions(path)
    items, _ = _fixture()
    path.write_text(json.dumps({"id": items[0].id, "task": "vqa", "prediction": "x"}) + "\n")
    with pytest.raises(ValueError, match="is for task 'vqa'"):
        E.evaluate(None, None, items, predictions_path=path, generate_fn=lambda b: [])


def test_evaluate_input_checks():
    items, predictions = _fixture()
    fake = CountingGenerator(predictions)
    with pytest.raises(ValueError, match="occurs twice"):
        E.evaluate(None, None, items + items[:1], generate_fn=fake)
    with pytest.raises(RuntimeError, match="process group"):
        E.evaluate(None, None, items, rank=1, world_size=2, generate_fn=fake)
    with pytest.raises(RuntimeError, match="returned 0 texts"):
        E.evaluate(None, None, items, generate_fn=lambda batch: [])


def test_report_table_summary_save(tmp_path):
    report = E.EvalReport({
        "vqa": {"n": 4.0, "accuracy": 0.75, "accuracy/presence": 0.5},
        "scene_cls": {"n": 2.0, "accuracy": 0.5},
        "multi_det": {"n": 3.0, "f1@0.5": 0.25},
    })
    lines = report.table().splitlines()
    assert lines[:2] == ["| task | metric | value |", "|---|---|---|"]
    assert lines[2:4] == ["| scene_cls | n | 2 |", "| scene_cls | accuracy | 0.5000 |"]
    assert "| vqa | accuracy/presence | 0.5000 |" in lines
    # Headline metrics; a missing headline (no mAP without gt) falls back to the first metric.
    assert report.summary() == {
        "scene_cls": ("accuracy", 0.5), "multi_det": ("f1@0.5", 0.25), "vqa": ("accuracy", 0.75)
    }
    saved = json.loads(report.save(tmp_path / "out" / "metrics.json").read_text())
    assert saved["metrics"] == report.metrics
    assert saved["summary"]["vqa"] == ["accuracy", 0.75]


# --------------------------------------------------------------------------- torchrun


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, directory: str, fail: bool = False) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if fail:
        def broken(*args, **kwargs):
            raise ValueError("metrics broke")

        E.score_predictions = broken
    try:
        items, predictions = _fixture()
        fake = CountingGenerator(predictions)
        report = E.evaluate(None, None, items, batch_size=2, rank=rank, world_size=world,
                            predictions_path=Path(directory) / "predictions.jsonl",
                            generate_fn=fake)
        out = {"generated": fake.generated, "metrics": report.metrics}
    except Exception as err:
        out = {"error": f"{type(err).__name__}: {err}"}
    finally:
        dist.destroy_process_group()
    (Path(directory) / f"rank{rank}.json").write_text(json.dumps(out))


def test_two_ranks_shard_and_gather(tmp_path):
    import torch.multiprocessing as mp

    items, predictions = _fixture()
    single = E.evaluate(None, None, items, generate_fn=CountingGenerator(predictions))
    # Fork: the ranks inherit the imported modules and compiled kernels (spawn re-imports them).
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["generated"] == [s.id for s in items[0::2]]
    assert results[1]["generated"] == [s.id for s in items[1::2]]
    assert results[0]["metrics"] == results[1]["metrics"]
    assert set(results[0]["metrics"]) == set(single.metrics)
    for task, values in single.metrics.items():
        assert results[0]["metrics"][task] == pytest.approx(values)
    merged = E.read_predictions(tmp_path / "predictions.jsonl")
    assert {k: v["prediction"] for k, v in merged.items()} == predictions
    assert not list(tmp_path.glob("predictions.rank*.jsonl"))


def test_a_failure_on_rank_0_reaches_every_rank(tmp_path):
    import torch.multiprocessing as mp

    _fixture()
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), True), nprocs=2,
                       join=True, start_method="fork")
    errors = [json.loads((tmp_path / f"rank{r}.json").read_text())["error"] for r in range(2)]
    assert errors[0] == "ValueError: metrics broke"
    assert errors[1].startswith("RuntimeError: evaluation failed on rank 0")
    assert "metrics broke" in errors[1]


# --------------------------------------------------------------------------- CLI


def _fake_checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    return directory


def test_cli_malformed_benchmark_is_a_clean_error(tmp_path, capsys):
    checkpoint = _fake_checkpoint(tmp_path / "ckpt")
    status = E.main(["--checkpoint", str(checkpoint), "--data",
                     str(HERE / "bench_malformed.jsonl")])
    err = capsys.readouterr().err
    assert status == 2
    assert "bench_malformed.jsonl: record 1 (line 2), id 'b2', field 'solution'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "missing.jsonl"], "no such file"),
        (["--data", "embedded:holdout"], "split must be train, val or test"),
        (["--tasks", "scene_cls,dance"], "unknown task(s) ['dance']"),
        (["--max-samples-per-task", "0"], "must be >= 1"),
        (["--workers", "-1"], "--workers must be >= 0"),
    ],
)
def test_cli_bad_options(tmp_path, capsys, args, message):
    checkpoint = _fake_checkpoint(tmp_path / "ckpt")
    assert E.main(["--checkpoint", str(checkpoint), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_not_a_checkpoint(tmp_path, capsys):
    assert E.main(["--checkpoint", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_embedded_data_follows_run_config(tmp_path):
    from geovlm.data.synthetic import embedded_splits

    checkpoint = _fake_checkpoint(tmp_path / "ckpt")
    (checkpoint / "run_config.yaml").write_text(
        "model:\n  box_convention: qwen2vl\n"
        "data:\n  seed: 3\n  n_test_scenes: 1\n  image_size: 84\n  tasks: [counting, vqa]\n"
    )
    run_config = E.read_run_config(checkpoint)
    got = E.load_samples("embedded", None, "auto", "qwen2vl", run_config)
    expected = embedded_splits(seed=3, n_train=0, n_val=0, n_test=1, image_size=84,
                               tasks=["counting", "vqa"], convention="qwen2vl")["test"]
    assert [(s.id, s.prompt, s.target.answer) for s in got] == [
        (s.id, s.prompt, s.target.answer) for s in expected
    ]
    assert {s.task for s in got} == {"counting", "vqa"}


def _embedded_test_samples(checkpoint: Path, run_config: str) -> list:
    """The embedded test split eval builds for ``checkpoint`` with this ``run_config.yaml``."""
    (checkpoint / "run_config.yaml").write_text(run_config)
    return E.load_samples("embedded", None, "auto", "qwen25vl", E.read_run_config(checkpoint))


def test_embedded_data_is_the_checkpoints_own_world(tmp_path):
    """A model trained on the large-object world is judged on it, not on the standard one."""
    from geovlm.data.synthetic import WorldSettings, embedded_splits

    checkpoint = _fake_checkpoint(tmp_path / "ckpt")
    got = _embedded_test_samples(
        checkpoint,
        "data:\n  seed: 2\n  n_test_scenes: 3\n  tasks: [referred_det]\n"
        "  object_scale: 2.0\n  max_objects: 3\n",
    )
    world = WorldSettings(object_scale=2.0, max_objects=3)
    large = embedded_splits(2, 0, 0, 3, tasks=["referred_det"], world=world)["test"]
    standard = embedded_splits(2, 0, 0, 3, tasks=["referred_det"])["test"]
    assert [s.target.answer for s in got] == [s.target.answer for s in large]
    assert [s.target.answer for s in got] != [s.target.answer for s in standard]
    with pytest.raises(E.EvalInputError, match="object_scale"):
        _embedded_test_samples(checkpoint, "data:\n  object_scale: 9.0\n")


def test_embedded_test_split_keeps_the_runs_per_task_scene_counts(tmp_path):
    got = _embedded_test_samples(
        _fake_checkpoint(tmp_path / "ckpt"),
        "data:\n  n_test_scenes: 2\n  tasks: [vqa, referred_det]\n"
        "  n_test_scenes_by_task: {referred_det: 5}\n",
    )
    assert [sum(s.task == t for s in got) for t in ("vqa", "referred_det")] == [2, 5]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A freshly built (untrained) tiny Qwen2.5-VL saved in HF format, as training saves one."""
    from geovlm.data.synthetic import corpus, embedded_splits
    from geovlm.model import build_policy, save_pretrained

    directory = tmp_path_factory.mktemp("tiny")
    texts = corpus(embedded_splits(seed=0, n_train=2, n_val=0, n_test=0)["train"])
    model, processor = build_policy(
        tokenizer_corpus=texts,
        tiny={"vocab_size": 600, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 1},
    )
    save_pretrained(model, processor, directory)
    return directory


def test_cli_end_to_end_on_embedded_test_split(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from geovlm.tasks import registry

    out = tmp_path / "eval"
    args = ["--checkpoint", str(tiny_checkpoint), "--max-samples-per-task", "1",
            "--max-new-tokens", "6", "--batch-size", "5", "--out", str(out)]
    assert E.main(args) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "metrics.json").read_text())
    assert list(saved["metrics"]) == list(registry.names())
    assert all(values["n"] == 1 for values in saved["metrics"].values())
    assert set(saved["summary"]) == set(registry.names())
    assert "| task | metric | value |" in printed and "| vqa | accuracy |" in printed
    records = E.read_predictions(out / "predictions.jsonl")
    assert sorted(r["task"] for r in records.values()) == sorted(registry.names())
    assert all(isinstance(r["prediction"], str) for r in records.values())
    # The image-blind baseline beside the model: label tasks and, on the embedded world whose
    # train split the run config rebuilds, box tasks; none for captions.
    blind = json.loads((out / "blind.json").read_text())
    assert {"scene_cls", "vqa", "change_det", "referred_det", "multi_det"} <= set(blind)
    assert "image_caption" not in blind and all(0 <= v <= 1 for v in blind.values())
    assert "| task | metric | model | blind |" in printed
    assert f"| scene_cls | accuracy | {saved['metrics']['scene_cls']['accuracy']:.4f} |" in printed

    # A rerun finds every prediction stored: the model generates nothing, the numbers repeat.
    def no_generation(*args, **kwargs):
        def fail(batch):
            raise AssertionError(f"generated {len(batch)} samples on a finished evaluation")
        return fail

    monkeypatch.setattr(E, "greedy_generator", no_generation)
    assert E.main(args) == 0
    assert json.loads((out / "metrics.json").read_text()) == saved


def test_cli_on_a_benchmark_file(tiny_checkpoint, tmp_path, capsys):
    assert E.checkpoint_pixel_budget(tiny_checkpoint) == (56 * 56, 224 * 224)
    out = tmp_path / "bench"
    args = ["--checkpoint", str(tiny_checkpoint), "--data", str(HERE / "bench.jsonl"),
            "--tasks", "vqa,referred_det", "--max-new-tokens", "4", "--out", str(out)]
    assert E.main(args) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert list(saved["metrics"]) == ["referred_det", "vqa"]
    assert set(E.read_predictions(out / "predictions.jsonl")) == {"b1", "b3"}
    # No train split for a benchmark file: the majority answer of the label task only.
    assert list(json.loads((out / "blind.json").read_text())) == ["vqa"]


def test_prompts_prepared_by_background_workers_give_the_same_predictions(tiny_checkpoint,
                                                                          tmp_path):
    common = ["--checkpoint", str(tiny_checkpoint), "--max-samples-per-task", "1",
              "--tasks", "scene_cls,referred_det,change_det,vqa", "--max-new-tokens", "5",
              "--batch-size", "2"]
    predictions = {}
    for workers in ("0", "2"):
        out = tmp_path / f"workers-{workers}"
        assert E.main([*common, "--workers", workers, "--out", str(out)]) == 0
        predictions[workers] = E.read_predictions(out / "predictions.jsonl")
    assert len(predictions["0"]) == 4
    assert predictions["2"] == predictions["0"]


# --------------------------------------------------------------------------- predictions files


EARTHDIAL_RESULTS = Path(__file__).parent / "fixtures" / "earthdial"


def test_predictions_cli_scores_earthdial_results_of_every_family(tmp_path):
    """One file mixing EarthDial result records of every family its scripts score, each
    record's family inferred from its fields; the paper's tables come out."""
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(p.read_text() for p in sorted(EARTHDIAL_RESULTS.glob("*.jsonl"))))
    out = tmp_path / "out"
    assert E.main(["--predictions", str(mixed), "--protocol", "earthdial", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["mixed"]
    assert set(results) == {
        "scene_cls", "vqa", "referred_det_rot", "grounding_desc", "region_caption",
        "image_caption", "change_caption", "multi_det", "change_det", "temporal_cls",
    }
    # AID answers "Medium Residential" for "MediumResidential": right once spaces are removed.
    assert results["scene_cls"] == {"n": 3, "accuracy": 1.0}
    assert results["vqa"]["accuracy/presence"] == 1.0 and "accuracy/count" not in results["vqa"]
    assert results["change_det"]["accuracy"] == 1.0 and results["temporal_cls"]["accuracy"] == 1.0
    assert set(results["grounding_desc"]) == {
        "n", "precision@0.5", "precision@0.25", "rouge_1", "rouge_l", "meteor"}
    table = (out / "table_referred_det_rot.csv").read_text().splitlines()
    assert table[0].startswith("benchmark,n,precision@0.5/small")
    assert table[1].startswith("mixed,3,")
    assert "### region_caption" in (out / "tables.md").read_text()


def test_predictions_cli_scores_own_predictions_of_every_task(tmp_path):
    """This project's predictions.jsonl with the benchmark it answers (--data): every registered
    task of the embedded world, under both protocols; perfect answers score 1 where the metric
    allows it."""
    from geovlm.tasks import registry

    items = E.load_samples("embedded", None, "auto", "qwen25vl", {})
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(
        json.dumps({"id": s.id, "task": s.task, "reference": s.target.answer,
                    "prediction": f"<think>x</think><answer>{s.target.answer}</answer>"}) + "\n"
        for s in items))
    for protocol in ("earthdial", "geovlm"):
        out = tmp_path / protocol
        argv = ["--predictions", str(path), "--data", "embedded", "--protocol", protocol,
                "--meteor", "nltk", "--out", str(out)]
        assert E.main(argv) == 0
        results = json.loads((out / "results.json").read_text())["embedded"]
        assert set(results) == set(registry.names())
        assert results["scene_cls"]["accuracy"] == 1.0
        assert results["change_det"]["accuracy"] == 1.0
    assert results["referred_det"]["acc@0.5"] == 1.0  # geovlm's own metric


def test_predictions_cli_own_predictions_need_data(tmp_path, capsys):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps({"id": "a", "task": "vqa", "prediction": "yes"}) + "\n")
    assert E.main(["--predictions", str(path)]) == 2
    assert "need --data" in capsys.readouterr().err
