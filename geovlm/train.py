"""``python -m geovlm.train``: run the stages a config lists (SFT, then per-task GRPO).

With no arguments it runs the embedded default (``tiny-cpu``): a tiny Qwen2.5-VL-architecture
model on the embedded synthetic EO world, on CPU, end to end, writing ``runs/<name>/``::

    config.yaml            the resolved config
    metrics.jsonl          one line per optimizer step (and per evaluation)
    init/                  the initial model + processor (HF format)
    stages/<i>-<name>/     checkpoint-<step>/ while running, final/ when done, eval/ tables
    training_curves.png    loss / reward / KL curves of every stage
    summary.md             the held-out table after every stage

Rerunning the same command resumes: finished stages are skipped, a running one continues from
its last checkpoint with the same data order and RNG streams.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from geovlm.config import ConfigError, RunConfig, describe_options, load_config, save_config
from geovlm.data.schema import TASKS
from geovlm.loop import MetricsLog, StageContext, seed_everything

HELP_EPILOG = """Overrides are key=value, e.g.  stages.sft.steps=20  model.path=/models/Qwen2.5-VL
Options (key = default [type]):
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m geovlm.train",
        description="SFT then per-task GRPO for Qwen2.5-VL on Earth-observation data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=HELP_EPILOG + describe_options(),
    )
    parser.add_argument(
        "--config",
        default=None,
        help="preset name (tiny-cpu, qwen2.5-vl-3b, "
        "qwen2.5-vl-7b) or a YAML path; default tiny-cpu",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="write a torch.profiler trace of a few steps of every stage",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_args(argv)


def pick_device(config: RunConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _model_kwargs(config: RunConfig, device: torch.device) -> dict:
    """``build_policy`` settings shared by every model a run builds or loads."""
    model_cfg = config.model
    return dict(
        device=device,
        dtype=None if model_cfg.dtype == "auto" else getattr(torch, model_cfg.dtype),
        attn_implementation=None
        if model_cfg.attn_implementation == "auto"
        else model_cfg.attn_implementation,
        gradient_checkpointing=model_cfg.gradient_checkpointing,
        freeze_vision=model_cfg.freeze_vision,
        seed=config.seed,
    )


def _patched(config: RunConfig, built: tuple):
    """Apply the GPU kernel patches the config asks for (a logged no-op off CUDA)."""
    from geovlm.model import apply_kernel_patches

    apply_kernel_patches(built[0], liger=config.model.liger_kernels)
    return built


def load_stage_model(config: RunConfig, path: Path, device: torch.device):
    """Model + processor from an HF checkpoint directory (a stage's ``final/`` or a real one)."""
    from geovlm.model import build_policy

    return _patched(config, build_policy(path=str(path), **_model_kwargs(config, device)))


def initial_model(config: RunConfig, corpus: list[str], device: torch.device):
    """The stage-0 policy: a local checkpoint, or the embedded tiny model (built once, saved)."""
    from dataclasses import asdict

    from geovlm.model import build_policy

    if config.model.path:
        return load_stage_model(config, Path(config.model.path), device), Path(config.model.path)
    init_dir = config.run_dir / "init"
    if (init_dir / "config.json").is_file():
        return load_stage_model(config, init_dir, device), init_dir
    model, processor = build_policy(
        tokenizer_corpus=corpus, tiny=asdict(config.model.tiny), **_model_kwargs(config, device)
    )
    if _is_main():
        from geovlm.checkpoint import save_checkpoint

        save_checkpoint(init_dir, model, processor, config, step=0)
    return _patched(config, (model, processor)), init_dir


def _is_main() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def evaluate_stage(config, model, processor, samples, out_dir: Path, label: str, rank, world):
    """The held-out evaluation (``geovlm.eval``) of one stage; prints and saves its table."""
    from geovlm.eval import evaluate

    out_dir.mkdir(parents=True, exist_ok=True)
    report = evaluate(
        model,
        processor,
        samples,
        batch_size=config.eval.batch_size,
        max_new_tokens=config.eval.max_new_tokens,
        convention=config.model.box_convention,
        use_embeddings=config.eval.use_embeddings,
        predictions_path=out_dir / "predictions.jsonl",
        desc=f"eval {label}",
        rank=rank,
        world_size=world,
        rollout_engine=config.rollout.engine,
    )
    if rank == 0:
        report.save(out_dir / "metrics.json")
        print(f"\n## Held-out evaluation after {label}\n\n{report.table()}\n", flush=True)
    return report


def run(config: RunConfig, profile: bool = False) -> dict:
    """Run every stage of ``config``; returns {stage label: eval summary}."""
    from geovlm.distributed import init_distributed
    from geovlm.plots import plot_training_curves

    rank, world = init_distributed(config)
    device = pick_device(config)
    if device.type == "cpu":
        torch.set_num_threads(config.threads or os.cpu_count() or 1)
    seed_everything(config.seed)
    run_dir = config.run_dir
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=rank == 0)

    from geovlm.data.sources import load_splits, select_tasks

    started = time.time()
    try:
        splits = load_splits(config.data, config.model.box_convention)
    except (ValueError, FileNotFoundError) as err:
        # Readers name the file, record and field; say it without a traceback.
        raise ConfigError(f"data: {err}") from err
    from geovlm.data.synthetic import corpus

    (model, processor), previous = initial_model(config, corpus(splits["train"]), device)
    summaries: dict[str, dict] = {}
    eval_samples = select_tasks(splits["test"], config.data.tasks)
    if config.eval.max_samples_per_task:
        eval_samples = _cap_per_task(eval_samples, config.eval.max_samples_per_task)
    # Batches of one task have similar answer lengths, so generation stops together.
    eval_samples.sort(key=lambda sample: list(TASKS).index(sample.task))

    def held_out(label: str, out_dir: Path, get_model) -> None:
        summary = held_out_summary(config, get_model, eval_samples, out_dir, label, rank, world)
        if summary is not None:
            summaries[label] = summary

    held_out("init", run_dir / "init_eval", lambda: (model, processor))
    objective: dict[str, dict] = {}
    for index, stage in enumerate(config.stages):
        ctx = StageContext(config, stage, index, device, rank, world, log)
        final = ctx.stage_dir / "final"
        if (final / "config.json").is_file():
            if rank == 0:
                print(f"stage {index} ({stage.name}) already finished: {final}", flush=True)
            # The evaluation may have been interrupted after the stage ended.
            held_out(
                stage.name,
                ctx.stage_dir / "eval",
                lambda final=final: load_stage_model(config, final, device),
            )
            saved = ctx.stage_dir / "eval" / "sampled_reward.json"
            if saved.is_file():
                objective[stage.name] = json.loads(saved.read_text())
            previous, model = final, None
            continue
        if model is None:
            model, processor = load_stage_model(config, previous, device)
        if rank == 0:
            # Evaluation files of an earlier run of this stage describe another model.
            shutil.rmtree(ctx.stage_dir / "eval", ignore_errors=True)
        tasks = stage.tasks or config.data.tasks
        train = select_tasks(splits["train"], tasks)
        if stage.kind == "sft":
            from geovlm.sft import run_sft

            val = select_tasks(splits["val"], tasks)
            engine = run_sft(model, processor, train, val, ctx, profile=profile or config.profile)
        else:
            from geovlm.grpo import run_grpo

            engine = run_grpo(model, processor, train, ctx, profile=profile or config.profile)
        save_final(ctx, engine, processor, final)
        model = engine.policy
        if world > 1 and config.distributed.strategy != "ddp":
            # Sharded weights: evaluate (and start the next stage) from the full checkpoint.
            del engine, model
            model, processor = load_stage_model(config, final, device)
        held_out(stage.name, ctx.stage_dir / "eval", lambda m=model, p=processor: (m, p))
        if stage.kind == "grpo" and rank == 0 and config.eval.enabled:
            objective[stage.name] = grpo_objective(
                ctx, model, processor, previous, select_tasks(eval_samples, tasks)
            )
        previous = final
        if rank == 0:
            plot_training_curves(log.records(), run_dir / "training_curves.png")

    if rank == 0 and summaries:
        write_summary(run_dir, summaries, objective, time.time() - started)
    return summaries


def grpo_objective(ctx: StageContext, model, processor, previous: Path, samples) -> dict:
    """Mean sampled reward on held-out prompts of the stage's tasks, before and after it."""
    from geovlm.grpo import sampled_reward

    config = ctx.config
    if not (config.eval.sampled_reward and samples):
        return {}
    out = ctx.stage_dir / "eval" / "sampled_reward.json"
    kwargs = dict(num_generations=config.eval.sampled_generations, seed=config.seed)
    before_model, before_processor = load_stage_model(config, previous, ctx.device)
    before = sampled_reward(before_model, before_processor, samples, ctx, **kwargs)
    del before_model
    after = sampled_reward(model, processor, samples, ctx, **kwargs)
    result = {
        "tasks": sorted({s.task for s in samples}),
        "prompts": len(samples),
        "before": before,
        "after": after,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        f"\nGRPO objective of {ctx.stage.name} on {len(samples)} held-out prompts of "
        f"{result['tasks']} ({config.eval.sampled_generations} samples each): mean reward "
        f"{before['reward']:.3f} -> {after['reward']:.3f}",
        flush=True,
    )
    return result


def held_out_summary(config, get_model, samples, out_dir: Path, label: str, rank, world):
    """The stage's held-out summary: saved by an earlier run, or evaluated now (None if off)."""
    saved = out_dir / "metrics.json"
    if saved.is_file():
        return _saved_summary(saved)
    if not config.eval.enabled:
        return None
    model, processor = get_model()
    return evaluate_stage(config, model, processor, samples, out_dir, label, rank, world).summary()


def save_final(ctx: StageContext, engine, processor, final: Path) -> None:
    """The stage's finished model as ``final/`` (collective: gathers sharded weights)."""
    from geovlm.checkpoint import save_checkpoint
    from geovlm.distributed import barrier

    state = engine.full_model_state()
    if ctx.is_main:
        save_checkpoint(
            final, engine.policy, processor, ctx.config, step=ctx.stage.steps, model_state=state
        )
    barrier()


def _saved_summary(path: Path) -> dict:
    """The summary of an evaluation saved by an earlier (interrupted) run of the same config."""
    return {task: tuple(value) for task, value in json.loads(path.read_text())["summary"].items()}


def _cap_per_task(samples, cap: int):
    seen: dict[str, int] = {}
    out = []
    for sample in samples:
        if seen.get(sample.task, 0) < cap:
            out.append(sample)
            seen[sample.task] = seen.get(sample.task, 0) + 1
    return out


def write_summary(
    run_dir: Path, summaries: dict[str, dict], objective: dict[str, dict], seconds: float
) -> None:
    """``summary.md``/``summary.json``: the headline metric of every task after every stage,
    and each GRPO stage's objective (sampled reward on held-out prompts) before and after it."""
    labels = list(summaries)
    tasks = [t for t in TASKS if any(t in s for s in summaries.values())]
    lines = [
        "| task | metric | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for task in tasks:
        metric = next(s[task][0] for s in summaries.values() if task in s)
        values = [
            f"{summaries[label][task][1]:.3f}" if task in summaries[label] else "-"
            for label in labels
        ]
        lines.append(f"| {task} | {metric} | " + " | ".join(values) + " |")
    table = "\n".join(lines)
    rows = [
        f"| {name} | {', '.join(o['tasks'])} | {o['prompts']} | {o['before']['reward']:.3f} | "
        f"{o['after']['reward']:.3f} | {o['before'].get('reward/accuracy', 0):.3f} -> "
        f"{o['after'].get('reward/accuracy', 0):.3f} |"
        for name, o in objective.items()
        if o
    ]
    if rows:
        table += (
            "\n\nGRPO objective on held-out prompts (mean reward of sampled completions):\n\n"
            "| stage | tasks | prompts | reward before | reward after | accuracy reward |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows)
        )
    (run_dir / "summary.md").write_text(table + f"\n\nwall time: {seconds:.0f} s\n")
    (run_dir / "summary.json").write_text(
        json.dumps({"held_out": summaries, "grpo_objective": objective}, indent=2)
    )
    print(
        f"\n## Summary (headline metric per task, by stage)\n\n{table}\n\nwall time: "
        f"{seconds:.0f} s; run directory: {run_dir}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        run(config, profile=args.profile)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
