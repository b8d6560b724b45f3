"""``python -m geovlm.train``: run the stages a config lists (SFT, then per-task GRPO).

With no arguments it runs the embedded default (``tiny-cpu``): a tiny Qwen2.5-VL-architecture
model on the embedded synthetic EO world, on CPU, end to end, writing ``runs/<name>/``::

    config.yaml            the resolved config
    metrics.jsonl          one line per optimizer step (and per evaluation)
    tensorboard/           the same metrics, the config and the held-out tables (report_to)
    init/                  the initial model + processor (HF format)
    stages/<i>-<name>/     checkpoint-<step>/ while running, final/ when done, eval/ tables
    training_curves.png    loss / reward / KL curves of every stage
    held_out.png           every task's held-out metric after every stage
    summary.md             the held-out table after every stage, which stage trained which task

Rerunning the same command resumes: finished stages are skipped, a running one continues from
its last checkpoint with the same data order and RNG streams. A different config under the same
run name is refused (``--existing-run`` says what to do instead; ``geovlm.rundir``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from geovlm.config import (
    ConfigError,
    RunConfig,
    check_stage_tasks,
    describe_options,
    load_config,
)
from geovlm.rundir import EXISTING_RUN_CHOICES, ExistingRun


def run(config: RunConfig, profile: bool = False, existing: ExistingRun = "resume") -> dict:
    """Run every stage of ``config``; returns {stage label: held-out summary}."""
    from geovlm import heldout, report
    from geovlm.anchor import anchor_samples, anchored_tasks
    from geovlm.checkpoint import holds_model
    from geovlm.data.sources import load_splits, model_pixel_budget, select_tasks, weigh_tasks
    from geovlm.data.synthetic import corpus
    from geovlm.loop import MetricsLog, StageContext
    from geovlm.model import initial_policy, load_policy, resolve_model_source
    from geovlm.runtime import RuntimeSetupError, barrier, seed_everything, start
    from geovlm.trackers import check_trackers, open_trackers

    started = time.time()
    check_stage_tasks(config)
    check_trackers(config)
    if config.model.path:
        try:
            resolve_model_source(config.model.path)  # a missing model is named before any work
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from err
    try:
        runtime = start(config.device, config.distributed.backend, config.threads)
    except RuntimeSetupError as err:
        raise ConfigError(str(err)) from err
    status = _claim_run_dir(config, existing, runtime)
    seed_everything(config.seed)
    from geovlm.data.encoding_cache import SHARED

    SHARED.resize(config.data.encoding_cache_mb << 20)
    trackers = open_trackers(config, runtime.is_main)
    log = MetricsLog(config.run_dir / "metrics.jsonl", enabled=runtime.is_main, trackers=trackers)
    try:
        splits = load_splits(
            config.data, config.model.box_convention, model_pixel_budget(config.model)
        )
    except (ValueError, FileNotFoundError) as err:
        # Readers name the file, record and field; say it without a traceback.
        raise ConfigError(f"data: {err}") from err
    if runtime.is_main:
        print(f"run {config.run_dir} ({status}); {runtime.world_size} process(es) on "
              f"{runtime.device}, {runtime.threads} CPU thread(s)", flush=True)

    (model, processor), previous = initial_policy(
        config, corpus(splits["train"]), runtime.device, runtime.is_main
    )
    vision_scores = _vision_pretrain_scores(previous)
    test = heldout.held_out_samples(config, splits["test"])
    summaries: dict[str, dict] = {}
    objective: dict[str, dict] = {}
    all_tasks = config.data.tasks or sorted({s.task for s in splits["train"]})
    trained = {stage.name: list(stage.tasks or all_tasks) for stage in config.stages}
    anchored = {
        stage.name: kept
        for stage in config.stages
        if (kept := anchored_tasks(stage, trained[stage.name], all_tasks))
    }
    # Only the main process draws and writes the summary, and only when there are held-out tables.
    blind = (heldout.blind_baseline(splits["train"], test, config.model.box_convention)
             if runtime.is_main and config.eval.enabled else {})

    def draw() -> None:
        report.draw_plots(config.run_dir, log.records(), summaries, trained, blind)

    def evaluate(label: str, out_dir: Path, get_model) -> bool:
        """Held-out table after ``label``; whether it is new (not saved by an earlier launch,
        which already sent it to the trackers)."""
        new = not (out_dir / "metrics.json").is_file()
        result = heldout.summary(config, runtime, test, out_dir, label, get_model)
        if result is not None:
            summaries[label] = result
        return new

    if evaluate("init", config.run_dir / "init_eval", lambda: (model, processor)):
        report.log_heldout(trackers, "init", summaries, objective)
    for index, stage in enumerate(config.stages):
        ctx = StageContext(config, stage, index, runtime, log)
        final = ctx.stage_dir / "final"
        tasks = stage.tasks or config.data.tasks
        if holds_model(final):
            if runtime.is_main:
                print(f"[{index}] {stage.name}: already finished ({final})", flush=True)
            model = None
        else:
            if model is None:
                model, processor = load_policy(config, previous, runtime.device)
            train = weigh_tasks(select_tasks(splits["train"], tasks), stage.task_weights)
            if stage.kind == "sft":
                from geovlm.sft import run_sft

                val = select_tasks(splits["val"], tasks)
                engine = run_sft(model, processor, train, val, ctx, profile or config.profile)
            else:
                from geovlm.grpo import run_grpo

                anchor = anchor_samples(splits["train"], stage, anchored.get(stage.name, []))
                engine = run_grpo(
                    model, processor, train, ctx, profile or config.profile, anchor=anchor
                )
            engine.save_final(final, processor, config, stage.steps)
            # LoRA adapters merged; None when sharded: evaluate (and start the next stage) from
            # the saved checkpoint.
            model = engine.release_model(final)
            del engine

        def current(final=final):
            nonlocal model, processor
            if model is None:
                model, processor = load_policy(config, final, runtime.device)
            return model, processor

        new_table = evaluate(stage.name, ctx.stage_dir / "eval", current)
        if stage.kind == "grpo" and runtime.is_main:
            objective[stage.name] = heldout.grpo_objective(
                ctx,
                select_tasks(test, tasks),
                lambda before=previous: load_policy(config, before, runtime.device),
                current,
            )
        if new_table:
            report.log_heldout(trackers, stage.name, summaries, objective)
        previous = final
        if runtime.is_main:
            draw()
        barrier()

    if runtime.is_main:
        if not config.stages:
            draw()  # otherwise drawn after the last stage, from the same records
        if summaries:
            table = report.write_summary(
                config.run_dir,
                summaries,
                objective,
                time.time() - started,
                trained,
                blind,
                vision_scores,
                anchored,
            )
            print(f"\n## Summary (headline metric per task, by stage)\n\n{table}\n\nwall time: "
                  f"{time.time() - started:.0f} s; run directory: {config.run_dir}", flush=True)
    trackers.close()
    return summaries


def _vision_pretrain_scores(init_dir: Path) -> dict | None:
    """The tower's pretraining scores saved beside init/'s weights, if it was pretrained."""
    from geovlm.model import VISION_PRETRAIN_FILE

    path = Path(init_dir) / VISION_PRETRAIN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _claim_run_dir(config: RunConfig, existing: ExistingRun, runtime) -> str:
    """``geovlm.rundir.prepare_run_dir`` on rank 0, its outcome (or refusal) on every rank."""
    from geovlm.rundir import prepare_run_dir
    from geovlm.runtime import broadcast_object

    outcome: tuple[str, str] | None = None
    if runtime.is_main:
        try:
            outcome = ("ok", prepare_run_dir(config, existing))
        except ConfigError as err:
            outcome = ("error", str(err))
    outcome = broadcast_object(outcome)
    if outcome[0] == "error":
        raise ConfigError(outcome[1])
    return outcome[1]


# --------------------------------------------------------------------------- command line

HELP_EPILOG = """Overrides are key=value, e.g.  stages.sft.steps=20  model.path=/models/Qwen2.5-VL
Stages are addressed by index or name (stages.1.lr=1e-6, stages.sft.steps=50); values are YAML
(lists: data.tasks=[vqa, counting]).
"""


def build_parser(preset: RunConfig | None = None) -> argparse.ArgumentParser:
    from geovlm.config import PRESET_DIR

    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    from geovlm.config import known_tasks

    tasks = ", ".join(known_tasks())
    epilog = HELP_EPILOG + f"Task names (data.tasks, stages.<i>.tasks): {tasks}\n"
    if preset is not None:
        epilog += f"\nOptions with the values of the preset {preset.name!r}:\n"
        epilog += describe_options(preset)
    parser = argparse.ArgumentParser(
        prog="python -m geovlm.train",
        description="SFT then per-task GRPO for Qwen2.5-VL on Earth-observation data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog,
    )
    parser.add_argument(
        "--config",
        default=None,
        help=f"preset name ({presets}) or a YAML path; default tiny-cpu",
    )
    parser.add_argument(
        "--existing-run",
        default="resume",
        choices=EXISTING_RUN_CHOICES,
        help="when runs/<name>/ already holds a run: resume it if its config is identical and "
        "refuse otherwise (resume, the default); delete it and start again (overwrite); or "
        "continue its checkpoints under the changed config (resume-changed)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="write a torch.profiler trace of a few steps of every stage",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        # The help shows the chosen preset's own values, so read --config first.
        known, _ = build_parser().parse_known_args([a for a in argv if a not in ("-h", "--help")])
        try:
            preset = load_config(known.config, [])
        except ConfigError:
            preset = None
        build_parser(preset).parse_args(argv)
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        run(config, profile=args.profile, existing=args.existing_run)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
