"""Trainer throughput: the same GRPO step through geovlm's trainer and through TRL's GRPOTrainer.

Run: ``python benchmarks/bench_trainer.py [--csv PATH] [--prompts P --generations G ...]``.

One step on either side: P prompts of the embedded EO world (image + text, Qwen2.5-VL chat
template with the project's system prompt) -> G sampled completions each, exactly L tokens long
-> ``geovlm.rewards.score`` -> group advantages -> reference log-probs (beta != 0) -> loss
(``dapo`` by default), backward, one AdamW step. What is held equal:

- the model: one checkpoint written once (``prepare``), loaded by both sides; the workers print
  the float64 sum of its parameters and the parent checks they agree;
- the prompts: the same P samples every step on both sides (the training set *is* those P
  samples); the parent checks both sides count the same prompt tokens;
- the completion length: ``min_new_tokens = max_new_tokens = L`` on both sides (TRL through
  ``generation_kwargs``; ours through the generation config ``geovlm.engines.builtin`` builds, see
  ``fix_completion_length``), and the image / video placeholder tokens are suppressed on both
  (TRL suppresses the image token by default; a sampled one breaks the next forward);
  both sides must report a mean completion length of exactly L;
- the optimisation: one optimizer step per batch (TRL: gradient_accumulation_steps = 1,
  steps_per_generation = 1, num_iterations = 1), the same AdamW with the same parameter groups
  and schedule (``geovlm.optim.make_optimizer`` / ``make_scheduler``, handed to TRL), gradient
  clipping at 1.0, the same loss_type / beta / epsilon / temperature / top_p;
- the reward: TRL's reward function calls the very ``geovlm.rewards.score`` our trainer calls,
  with the same options;
- gradient checkpointing (non-reentrant) on both or neither; dtype and attention backend from
  the one checkpoint (fp32 + SDPA on CPU, bf16 on CUDA).

Each side runs in its own fresh process (``--worker``): W warm-up steps (first calls, Numba and
autotune caches) then N timed steps; a step's time is the wall time between the ends of two
consecutive optimizer steps (CUDA synchronised), so it includes everything the trainer does per
step (generation, rewards, reference forward, loss, backward, optimizer, logging). The table
gives the median (min) step time, completion tokens per second (P * G * L / median) and, on
CUDA, the peak memory allocated over the timed steps; ratio = TRL median / ours median.

``--rollout`` times the rollout alone instead (``run_rollout``): the built-in engine's
``generate`` of the same P x G completions of exactly L tokens, in one process, alternating calls
that return the sampling log-probs (``return_logprobs=True``: the full-vocabulary log-softmax
every decode step that each rollout paid before the rollout-engine seam) with calls that do not
(the default now), the same seed for both so that they sample the same tokens. Each setting is
also timed with L = 1, so ``(t(L) - t(1)) / (L - 1)`` is the time of one decode step.
``--vocab V`` gives the tiny model a V-token LM head (151,936 is Qwen2.5-VL's) to see the
vocabulary's share on CPU.

Defaults: on CPU the embedded default tiny model (``TinyModelConfig``), fp32, P = 4, G = 8,
L = 32; on CUDA a randomly initialised model of the real Qwen2.5-VL-3B architecture (config only,
no weights; see ``qwen25_vl_3b_config``), bf16, 448 x 448 images (256 image tokens), P = 4,
G = 8, L = 128, gradient checkpointing on. The tiny BPE tokenizer serves both models, so
completions of the 3B model decode mostly to empty text (ids beyond the tokenizer); the rewards
are then mostly 0 on both sides, which costs them the same.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _provenance  # benchmarks/_provenance.py: the script's directory is on sys.path
import torch

DEFAULT_TASKS = ("scene_cls", "counting", "referred_det", "vqa")
# "ours-unshared": our trainer with stage.prompt_sharing off (each prompt run G times, as TRL
# does), to show what sharing the prompt across its group is worth on its own.
SIDES = ("ours", "ours-unshared", "trl")
QWEN25_VL_3B_VOCAB = 151_936


@dataclass
class Spec:
    """Everything both sides must agree on (serialised to each worker)."""

    device: str
    model: str  # "tiny" | "3b"
    prompts: int
    generations: int
    max_new_tokens: int
    steps: int
    warmup: int
    loss_type: str = "dapo"
    beta: float = 0.04
    lr: float = 1e-5
    temperature: float = 1.0
    image_size: int = 112
    checkpointing: bool = False
    freeze_vision: bool = False
    threads: int = 1
    seed: int = 0
    tasks: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TASKS)
    vocab: int | None = None  # tiny model only: the LM head's vocabulary (default: the tokenizer's)
    data_workers: int = 0  # ours: background processes preparing the next steps' prompts


# --- the shared inputs --------------------------------------------------------------------------


def bench_samples(spec: Spec):
    """The P training samples (tasks interleaved), deterministic in ``spec``."""
    from geovlm.data.synthetic import embedded_splits

    scenes = max(8, math.ceil(spec.prompts / len(spec.tasks)))
    world = embedded_splits(
        seed=spec.seed, n_train=scenes, n_val=1, n_test=1, image_size=spec.image_size,
        tasks=list(spec.tasks),
    )
    train = world["train"]
    if len(train) < spec.prompts:
        raise ValueError(f"the embedded world gave {len(train)} samples, need {spec.prompts}")
    return train, train[: spec.prompts]


def qwen25_vl_3b_config(tokenizer):
    """``Qwen2_5_VLConfig`` with the sizes of Qwen2.5-VL-3B-Instruct (3.75 B parameters).

    Language model: hidden 2048, 36 layers, 16 heads, 2 KV heads, MLP 11008, vocabulary 151,936,
    tied embeddings, rope theta 1e6. Vision tower: 32 blocks, hidden 1280, MLP 3420, 16 heads,
    window attention with full attention in blocks 7, 15, 23, 31, merger out 2048. Special-token
    ids come from ``tokenizer`` (all below the vocabulary size).
    """
    from geovlm.model import tiny_config

    sizes = {
        "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
        "rope_theta": 1_000_000.0, "tie_word_embeddings": True, "vision_depth": 32,
        "vision_hidden_size": 1280, "vision_intermediate_size": 3420, "vision_num_heads": 16,
    }
    config = tiny_config(tokenizer, sizes)
    config.text_config.vocab_size = QWEN25_VL_3B_VOCAB
    config.vision_config.fullatt_block_indexes = [7, 15, 23, 31]
    return config


def prepare(spec: Spec, model_dir: Path) -> None:
    """Write the benchmark checkpoint (model + processor) both sides load."""
    from geovlm.data.synthetic import corpus
    from geovlm.model import build_policy, save_pretrained

    train, _ = bench_samples(spec)
    if spec.model == "tiny" and spec.vocab:
        from transformers import AutoModelForImageTextToText

        from geovlm.config import TinyModelConfig
        from geovlm.model import tiny_config, tiny_processor
        from geovlm.tokenizer import build_tokenizer

        sizes = asdict(TinyModelConfig())
        tokenizer = build_tokenizer(corpus(train), vocab_size=sizes["vocab_size"])
        processor = tiny_processor(tokenizer, sizes["min_pixels"], sizes["max_pixels"])
        config = tiny_config(tokenizer, sizes)
        config.text_config.vocab_size = spec.vocab
        torch.manual_seed(spec.seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        model.generation_config.eos_token_id = config.text_config.eos_token_id
        model.generation_config.pad_token_id = config.text_config.pad_token_id
    elif spec.model == "tiny":
        from geovlm.config import TinyModelConfig

        model, processor = build_policy(
            tokenizer_corpus=corpus(train), tiny=asdict(TinyModelConfig()), device="cpu",
            dtype=torch.float32, seed=spec.seed,
        )
    else:
        from transformers import AutoModelForImageTextToText

        from geovlm.model import tiny_processor
        from geovlm.tokenizer import build_tokenizer

        tokenizer = build_tokenizer(corpus(train), vocab_size=2000)
        processor = tiny_processor(tokenizer, min_pixels=56 * 56, max_pixels=1024 * 1024)
        config = qwen25_vl_3b_config(tokenizer)
        torch.manual_seed(spec.seed)
        # Initialised on the device: a CPU init of 3.75 B parameters takes minutes.
        with torch.device(spec.device):
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
        model.generation_config.eos_token_id = config.text_config.eos_token_id
        model.generation_config.pad_token_id = config.text_config.pad_token_id
    save_pretrained(model, processor, model_dir)


def load_model(spec: Spec, model_dir: Path):
    from geovlm.model import build_policy

    return build_policy(
        path=str(model_dir), device=spec.device,
        dtype=torch.float32 if spec.device == "cpu" else torch.bfloat16,
        gradient_checkpointing=False, freeze_vision=spec.freeze_vision,
    )


def placeholder_ids(model) -> list[int]:
    return [int(model.config.image_token_id), int(model.config.video_token_id)]


def fix_completion_length(length: int) -> None:
    """Every rollout of our trainer emits exactly ``length`` tokens.

    The built-in engine (``geovlm.engines.builtin``) builds one GenerationConfig per call
    (vision placeholders suppressed) and both of its decoders (the shared-prompt loop and HF
    generate) honour ``min_new_tokens``; this sets it on that config and changes nothing else.
    Calling it again replaces the length (the original builder is wrapped once).
    """
    from geovlm.engines import builtin

    make_config = getattr(builtin._generation_config, "unfixed", builtin._generation_config)

    def generation_config(*args, **kwargs):
        config = copy.deepcopy(make_config(*args, **kwargs))
        config.min_new_tokens = length
        return config

    generation_config.unfixed = make_config
    builtin._generation_config = generation_config


def parameter_sum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


class StepClock:
    """End-of-step timestamps; resets the CUDA peak-memory counter when warm-up ends."""

    def __init__(self, device: str, warmup: int):
        self.device = device
        self.warmup = warmup
        self.ends: list[float] = []
        self.records: list[dict] = []

    def tick(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        if self.device == "cuda" and len(self.ends) == self.warmup:
            torch.cuda.reset_peak_memory_stats()

    def write(self, record: dict) -> None:
        """``MetricsLog.write``'s signature: our trainer logs once per optimizer step."""
        self.tick()
        self.records.append(record)

    def step_seconds(self) -> list[float]:
        """Durations of the steps after warm-up (step k ends at ``ends[k]``)."""
        timed = self.ends[self.warmup - 1 :]
        return [b - a for a, b in zip(timed, timed[1:], strict=False)]


def prompt_tokens_ours(processor, samples) -> int:
    from geovlm.data.collate import collate_prompts

    return int(collate_prompts(samples, processor)["attention_mask"].sum())


# --- the two sides ------------------------------------------------------------------------------


def stage_context(spec: Spec, workdir: Path, log=None, prompt_sharing: bool = True):
    """The run/stage config both sides take their settings from, as a ``StageContext``."""
    from geovlm.config import DataConfig, RunConfig, StageConfig
    from geovlm.loop import StageContext

    stage = StageConfig(
        name="grpo", kind="grpo", steps=spec.warmup + spec.steps, batch_size=spec.prompts,
        lr=spec.lr, warmup_ratio=0.0, save_every=0, num_generations=spec.generations,
        max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, beta=spec.beta,
        loss_type=spec.loss_type, prompt_sharing=prompt_sharing,
    )
    config = RunConfig(
        name="run", output_dir=str(workdir), device=spec.device, stages=[stage],
        data=DataConfig(workers=spec.data_workers),
    )
    from geovlm.runtime import Runtime

    runtime = Runtime(0, 1, 0, torch.device(spec.device), torch.get_num_threads())
    return StageContext(config, stage, 0, runtime, log=log)


def run_ours(spec: Spec, model_dir: Path, workdir: Path, prompt_sharing: bool = True) -> dict:
    from geovlm.grpo import run_grpo
    from geovlm.model import enable_checkpointing

    model, processor = load_model(spec, model_dir)
    checksum = parameter_sum(model)
    if spec.checkpointing:
        enable_checkpointing(model)
    fix_completion_length(spec.max_new_tokens)
    _, samples = bench_samples(spec)
    clock = StepClock(spec.device, spec.warmup)
    run_grpo(model, processor, samples, stage_context(spec, workdir, clock, prompt_sharing))
    lengths = [r["completion_length"] for r in clock.records]
    return {
        "step_s": clock.step_seconds(), "completion_length": lengths, "checksum": checksum,
        "prompt_tokens": prompt_tokens_ours(processor, samples),
    }


def run_trl(spec: Spec, model_dir: Path, workdir: Path) -> dict:
    try:
        import datasets
        import trl
        from transformers import TrainerCallback
    except ImportError as err:
        return {"skipped": f"TRL not importable: {err}"}
    from trl.data_utils import prepare_multimodal_messages

    from geovlm.data.collate import DEFAULT_SYSTEM_PROMPT
    from geovlm.grpo import reward_options
    from geovlm.optim import make_optimizer, make_scheduler
    from geovlm.rewards import score

    model, processor = load_model(spec, model_dir)
    checksum = parameter_sum(model)
    _, samples = bench_samples(spec)
    rows = []
    for index, sample in enumerate(samples):
        messages = [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": sample.prompt},
        ]
        rows.append({"prompt": messages, "images": sample.load_images(), "row": index})
    # TRL tokenises each prompt with the processor's chat template and its own image resizing.
    tokenised = processor.apply_chat_template(
        conversation=[prepare_multimodal_messages(r["prompt"], r["images"]) for r in rows],
        add_generation_prompt=True, tokenize=True, return_dict=True,
    )
    prompt_tokens = sum(len(ids) for ids in tokenised["input_ids"])

    ctx = stage_context(spec, workdir)
    stage = ctx.stage
    options = reward_options(ctx, processor)

    def geovlm_reward(prompts, completions, row, **kwargs):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        chosen = [samples[i] for i in row]
        return score(
            [s.task for s in chosen], texts, [s.target for s in chosen],
            weights=stage.reward_weights or None, options=options,
            prompts=[s.prompt for s in chosen],
        ).total.tolist()

    optimizer = make_optimizer(model, stage)
    clock = StepClock(spec.device, spec.warmup)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    args = trl.GRPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=stage.batch_size * stage.num_generations,
        num_generations=stage.num_generations, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=stage.num_iterations, max_steps=stage.steps,
        max_completion_length=stage.max_new_tokens,
        generation_kwargs={
            "min_new_tokens": stage.max_new_tokens, "suppress_tokens": placeholder_ids(model),
        },
        temperature=stage.temperature, top_p=stage.top_p, top_k=0, loss_type=stage.loss_type,
        beta=stage.beta, epsilon=stage.epsilon_low, epsilon_high=stage.epsilon_high,
        max_grad_norm=stage.max_grad_norm, scale_rewards=stage.scale_rewards,
        gradient_checkpointing=spec.checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=spec.device == "cuda",
        use_cpu=spec.device == "cpu", logging_steps=1, report_to=[], save_strategy="no",
        disable_tqdm=True, seed=spec.seed, dataloader_num_workers=0,
    )
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=geovlm_reward, args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=processor, optimizers=(optimizer, make_scheduler(optimizer, stage)),
        callbacks=[Clock()],
    )
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history
               if "completions/mean_length" in h]
    return {
        "step_s": clock.step_seconds(), "completion_length": lengths, "checksum": checksum,
        "prompt_tokens": prompt_tokens,
    }


def run_rollout(spec: Spec, model_dir: Path) -> dict:
    """Seconds of each rollout by clock (``wall``; on CPU also ``cpu``, the process's CPU time,
    which a shared machine's load disturbs far less), then by (log-probs returned, completion
    length), warm-up excluded.

    Calls alternate the settings (and their order every repeat) so that load drift spreads over
    both; both settings of a repeat use the same seed, hence sample the same tokens.
    """
    from geovlm.engines.base import EngineSetup, Sampling
    from geovlm.engines.builtin import BuiltinEngine

    model, processor = load_model(spec, model_dir)
    _, samples = bench_samples(spec)
    engine = BuiltinEngine(model, processor, EngineSetup())
    settings = [(flag, length) for flag in (True, False) for length in (spec.max_new_tokens, 1)]
    clocks = {"wall": time.perf_counter}
    if spec.device == "cpu":
        clocks["cpu"] = time.process_time
    times = {clock: {f"{flag}/{length}": [] for flag, length in settings} for clock in clocks}
    lengths = set()
    for repeat in range(spec.warmup + spec.steps):
        for flag, length in settings if repeat % 2 == 0 else settings[::-1]:
            fix_completion_length(length)
            sampling = Sampling(
                length, spec.temperature, seed=spec.seed + repeat, return_logprobs=flag
            )
            if spec.device == "cuda":
                torch.cuda.synchronize()
            starts = {clock: now() for clock, now in clocks.items()}
            rollouts = engine.generate(samples, spec.generations, sampling)
            if spec.device == "cuda":
                torch.cuda.synchronize()
            if repeat >= spec.warmup:
                for clock, now in clocks.items():
                    times[clock][f"{flag}/{length}"].append(now() - starts[clock])
            lengths.update(rollouts.lengths.tolist())
            if (rollouts.logprobs is not None) != flag:
                raise RuntimeError(f"return_logprobs={flag} returned {rollouts.logprobs}")
    if lengths != {1, spec.max_new_tokens}:
        raise RuntimeError(f"completion lengths {sorted(lengths)}, not 1 and {spec.max_new_tokens}")
    return {"times": times, "prompt_tokens": prompt_tokens_ours(processor, samples),
            "vocab": int(model.config.get_text_config().vocab_size)}


def report_rollout(spec: Spec, runs: list[dict], csv_path: str | None) -> None:
    """Median rollout and decode-step times with and without log-probs, and their ratio, per
    clock; the decode step is ``(t(L) - t(1)) / (L - 1)`` of the medians."""
    first = runs[0]
    L = spec.max_new_tokens
    shape = (f"{spec.model} model, V={first['vocab']}, P={spec.prompts} x G={spec.generations}, "
             f"L={L}, {first['prompt_tokens']} prompt tokens, T={spec.temperature}")
    machine = _provenance.machine(spec.device)
    print(f"# Rollout (built-in engine, shared prompts) with and without sampling log-probs "
          f"({spec.device})")
    print(f"machine: {machine}; load {_provenance.load_text()}; commit {_provenance.commit()}; "
          f"{shape}; median of {len(runs)} x {spec.steps} calls each, after {spec.warmup} "
          "warm-up")
    print("| clock | log-probs | rollout median (min) s | decode step ms |")
    print("|---|---|---|---|")
    rows = []
    for clock in first["times"]:
        times = {key: [t for run in runs for t in run["times"][clock][key]]
                 for key in first["times"][clock]}
        median = {key: statistics.median(values) for key, values in times.items()}
        step = {}
        for flag in (True, False):
            full, one = median[f"{flag}/{L}"], median[f"{flag}/1"]
            step[flag] = (full - one) / max(L - 1, 1)
            name = "returned (before)" if flag else "not returned (now)"
            print(f"| {clock} | {name} | {full:.4f} ({min(times[f'{flag}/{L}']):.4f}) | "
                  f"{step[flag] * 1e3:.3f} |")
            rows.append({
                "machine": machine, "date": datetime.date.today().isoformat(),
                "commit": _provenance.commit(), "load": _provenance.load_text(), "shape": shape,
                "clock": clock, "return_logprobs": flag, "rollout_median_s": full,
                "rollout_min_s": min(times[f"{flag}/{L}"]), "decode_step_ms": step[flag] * 1e3,
                "rollouts": ";".join(f"{t:.4f}" for t in times[f"{flag}/{L}"]),
            })
        print(f"{clock}: ratio before / now: rollout "
              f"{median[f'True/{L}'] / median[f'False/{L}']:.3f}x, "
              f"decode step {step[True] / step[False]:.3f}x")
    if csv_path:
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def worker(side: str, spec: Spec, workdir: Path, result: Path) -> None:
    torch.set_num_threads(spec.threads)
    if spec.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model_dir = workdir / "model"
    if side == "prepare":
        prepare(spec, model_dir)
        out: dict = {}
    elif side == "rollout":
        out = run_rollout(spec, model_dir)
    else:
        if side == "trl":
            out = run_trl(spec, model_dir, workdir / side)
        else:
            out = run_ours(spec, model_dir, workdir / side, prompt_sharing=side == "ours")
        if spec.device == "cuda" and "skipped" not in out:
            out["peak_bytes"] = torch.cuda.max_memory_allocated()
    result.write_text(json.dumps(out))


# --- the parent: run the sides, check they did the same work, report -----------------------------


def spawn(side: str, spec: Spec, workdir: Path) -> dict:
    result = workdir / f"{side}.json"
    log = workdir / f"{side}.log"
    command = [sys.executable, __file__, "--worker", side, "--spec", json.dumps(asdict(spec)),
               "--workdir", str(workdir), "--result", str(result)]
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0 or not result.is_file():
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"worker {side!r} failed (exit code {code}); last lines:\n{tail}")
    return json.loads(result.read_text())


def pool(rounds: list[dict]) -> dict:
    """One side's rounds as one result: step times pooled, the rest the same in every round."""
    skipped = [r for r in rounds if "skipped" in r]
    if skipped:
        return skipped[0]
    first = rounds[0]
    pooled = {**first, "step_s": [t for r in rounds for t in r["step_s"]]}
    pooled["completion_length"] = [x for r in rounds for x in r["completion_length"]]
    if "peak_bytes" in first:
        pooled["peak_bytes"] = max(r["peak_bytes"] for r in rounds)
    return pooled


def check_same_work(spec: Spec, results: dict[str, dict]) -> None:
    """Refuse to report a ratio unless both sides did the same work."""
    ran = {side: r for side, r in results.items() if "skipped" not in r}
    for side, r in ran.items():
        if len(r["step_s"]) % spec.steps:
            raise RuntimeError(f"{side}: {len(r['step_s'])} timed steps, not {spec.steps} a run")
        if any(abs(length - spec.max_new_tokens) > 1e-9 for length in r["completion_length"]):
            raise RuntimeError(
                f"{side}: completion lengths {r['completion_length']} are not all "
                f"{spec.max_new_tokens}"
            )
    if "ours" not in ran:
        return
    ours = ran["ours"]
    for side, other in ran.items():
        if not math.isclose(ours["checksum"], other["checksum"], rel_tol=1e-12):
            raise RuntimeError(f"the sides loaded different weights: ours {ours['checksum']} vs "
                               f"{side} {other['checksum']}")
        if ours["prompt_tokens"] != other["prompt_tokens"]:
            raise RuntimeError(f"prompt tokens differ: ours {ours['prompt_tokens']}, {side} "
                               f"{other['prompt_tokens']}")


def report(spec: Spec, results: dict[str, dict], csv_path: str | None, rounds: int) -> None:
    tokens = spec.prompts * spec.generations * spec.max_new_tokens
    shape = (f"{spec.model} model, P={spec.prompts} x G={spec.generations}, L={spec.max_new_tokens}"
             f", {results['ours']['prompt_tokens']} prompt tokens, {spec.loss_type}, "
             f"beta={spec.beta}, ckpt={'on' if spec.checkpointing else 'off'}, "
             f"vision {'frozen' if spec.freeze_vision else 'trained'}")
    machine = _provenance.machine(spec.device)
    print(f"# GRPO step: geovlm trainer vs TRL {_trl_version()} GRPOTrainer ({spec.device})")
    print(f"machine: {machine}; load {_provenance.load_text()}; commit {_provenance.commit()}; "
          f"{shape}; median of {rounds} x {spec.steps} steps, each run after {spec.warmup} warm-up")
    medians = {s: statistics.median(r["step_s"]) for s, r in results.items() if "skipped" not in r}
    rows = []
    print("| side | step median (min) s | completion tokens/s | peak memory GiB |")
    print("|---|---|---|---|")
    for side, r in results.items():
        if "skipped" in r:
            print(f"| {side} | skipped: {r['skipped']} | | |")
            continue
        peak = r.get("peak_bytes")
        peak_text = f"{peak / 2**30:.2f}" if peak is not None else "-"
        print(f"| {side} | {medians[side]:.3f} ({min(r['step_s']):.3f}) | "
              f"{tokens / medians[side]:.1f} | {peak_text} |")
        rows.append({
            "machine": machine, "date": datetime.date.today().isoformat(),
            "commit": _provenance.commit(), "load": _provenance.load_text(), "side": side,
            "shape": shape,
            "median_s": medians[side], "min_s": min(r["step_s"]),
            "tokens_per_s": tokens / medians[side], "peak_bytes": peak if peak is not None else "",
            "steps": ";".join(f"{t:.4f}" for t in r["step_s"]),
        })
    if "trl" in medians:
        for side in medians:
            if side != "trl":
                print(f"ratio TRL / {side} (step time): {medians['trl'] / medians[side]:.2f}x")
    if csv_path and rows:
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _trl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trl")
    except PackageNotFoundError:
        return "(not installed)"


def default_spec(args: argparse.Namespace) -> Spec:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device == "cuda"
    model = args.model or ("3b" if on_cuda else "tiny")
    big = model == "3b"
    return Spec(
        device=device, model=model, prompts=args.prompts, generations=args.generations,
        max_new_tokens=args.max_new_tokens or (128 if big else 32),
        steps=args.steps or (3 if big else 5), warmup=args.warmup, loss_type=args.loss_type,
        beta=args.beta, image_size=args.image_size or (448 if big else 112),
        checkpointing=args.checkpointing if args.checkpointing is not None else big,
        freeze_vision=args.freeze_vision if args.freeze_vision is not None else big,
        threads=args.threads, tasks=tuple(args.tasks.split(",")), vocab=args.vocab,
        data_workers=args.data_workers,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--model", choices=["tiny", "3b"], default=None)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=None,
                        help="train the language model only (default: on for 3b, as the preset)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    parser.add_argument("--data-workers", type=int, default=0,
                        help="our side: background processes that prepare the next steps' "
                        "prompts (data.workers; TRL's side keeps dataloader_num_workers=0)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--rounds", type=int, default=None,
                        help="run each side this many times, alternating the order "
                             "(default 2 on CPU, 1 on CUDA)")
    parser.add_argument("--rollout", action="store_true",
                        help="time the rollout alone, with and without sampling log-probs")
    parser.add_argument("--vocab", type=int, default=None,
                        help="tiny model: LM-head vocabulary (151936 = Qwen2.5-VL's)")
    parser.add_argument("--worker", choices=["prepare", "rollout", *SIDES],
                        help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        data = json.loads(args.spec)
        spec = Spec(**{**data, "tasks": tuple(data["tasks"])})
        worker(args.worker, spec, Path(args.workdir), Path(args.result))
        return 0

    spec = default_spec(args)
    if spec.vocab is not None and spec.model != "tiny":
        parser.error("--vocab applies to the tiny model only")
    if spec.warmup < 1 or spec.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (a step is timed from the previous end)")
    sides = [s for s in args.sides.split(",") if s]
    if "ours" not in sides or not set(sides) <= set(SIDES):
        parser.error(f"--sides must include 'ours' and be among {SIDES}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rounds = args.rounds if args.rounds is not None else (1 if spec.device == "cuda" else 2)
    if rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.rollout:
        with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
            spawn("prepare", spec, Path(tmp))
            report_rollout(spec, [spawn("rollout", spec, Path(tmp)) for _ in range(rounds)],
                           args.csv)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        workdir = Path(tmp)
        spawn("prepare", spec, workdir)
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for round_index in range(rounds):
            # Alternate the order so that a drift in machine load does not favour one side.
            for side in sides if round_index % 2 == 0 else sides[::-1]:
                try:
                    result = spawn(side, spec, workdir)
                except RuntimeError as err:
                    if side == "ours":
                        raise
                    # Still report our side (one GPU call is all a check may get).
                    print(err, file=sys.stderr)
                    result = {"skipped": str(err).splitlines()[0]}
                check_same_work(spec, {side: result})
                runs[side].append(result)
    results = {side: pool(side_runs) for side, side_runs in runs.items()}
    check_same_work(spec, results)
    report(spec, results, args.csv, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
