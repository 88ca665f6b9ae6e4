"""The one training loop every stage uses: pretraining, SFT, the reward model, DPO, PPO and GRPO.

A stage brings its data, its model (with its head) and its loss. Everything else is here and works
the same way for every stage:

- device and precision, chosen once and printed (fp32 on CPU, bf16 autocast on CUDA);
- the parallel layout, applied from outside by `scratchlm.parallel` (DDP and FSDP2 for any
  stage; tensor and pipeline parallelism and DeepSpeed for the language-model loss);
- micro-batches and gradient accumulation, clipping, the optimizer and its schedule, compile;
- the time budget, the progress bar and metrics.jsonl, every row tagged with its stage;
- atomic checkpoints that resume exactly (weights, optimizer moments, schedule position, data
  position, RNG states), through scratchlm.checkpoint's manager (`save`, `restore`), and
  SIGINT/SIGTERM, which finish the step and save before stopping;
- the faults of a long run (train/faults.py): the run folder's lock, a full disk, a non-finite
  loss (on_nonfinite = "stop" | "skip"), running out of GPU memory, each one line.

A stage that trains one model reads:

    session = Session("sft", run_dir, recipe.sft, recipe.parallel, resume)
    batch = session.batch_layout(rows_per_step, recipe.sft.micro_batch_size)  # (micro, accum)
    trainer = session.trainer(model, batch)          # moved, parallelised, with its optimizer
    result = session.run(lambda: trainer.step(data.next_batch(), loss_fn), evaluate, {"data": data})

PPO trains a second model (the value model) in the same session: `session.trainer(critic, name=
"critic")`; both are saved in one checkpoint and resumed together.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from scratchlm import parallel
from scratchlm.checkpoint import Checkpoint
from scratchlm.checkpoint.manager import CheckpointManager
from scratchlm.config import ParallelConfig, TrainConfig
from scratchlm.device import Runtime, pick_runtime
from scratchlm.errors import UserError
from scratchlm.parallel.deepspeed import DeepSpeedRunner
from scratchlm.train import faults
from scratchlm.train.metrics import MetricsLog, drop_rows
from scratchlm.train.optim import build_optimizer, lr_factor
from scratchlm.train.rng import get_rng_state, set_rng_state

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]]
"""loss_fn(model, micro_batch) -> (the micro-batch's mean loss, further metrics to log)."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint was saved. Carries the signal number."""

    def __init__(self, stage: str, signum: int, saved: Path):
        super().__init__(f"stopped by signal {signum}; checkpoint saved to {saved}")
        self.stage = stage
        self.signum = signum


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a step is never cut in half."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now, without waiting for the step
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def cut_batch(batch: Any, parts: int) -> list[Any]:
    """A batch (a tensor, or a tuple or dict of tensors sharing the first dimension) cut into
    `parts` micro-batches along that dimension."""
    if isinstance(batch, torch.Tensor):
        return list(batch.chunk(parts))
    if isinstance(batch, dict):
        pieces = {k: cut_batch(v, parts) for k, v in batch.items()}
        return [{k: v[i] for k, v in pieces.items()} for i in range(parts)]
    if isinstance(batch, (tuple, list)):
        return [tuple(p) for p in zip(*(cut_batch(v, parts) for v in batch), strict=True)]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__}")


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Trainer:
    """One model being trained: its parallel wrapping, its optimizer and the accumulation step."""

    def __init__(
        self,
        session: Session,
        name: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: dict[str, Any],
        batch: tuple[int, int],
    ) -> None:
        self.session, self.name, self.config = session, name, config
        self.micro, self.accum = batch
        self.model = model
        """As `parallel.apply` returned it: what checkpoints and gradient sync work on."""
        self.optimizer = optimizer
        self.forward_model = torch.compile(model) if session.cfg.compile else model
        self.nonfinite: dict[str, float] | None = None
        """The metrics of this session step's first update with a non-finite loss or gradient
        norm; that update was not applied."""

    def set_lr(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self, batch: Any, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over this rank's part of the global batch.

        `batch` is split into the trainer's micro-batches (or is a list of them already). The
        gradient is the mean over micro-batches and ranks of each micro-batch's loss. Returns the
        mean loss, the gradient norm and the means of loss_fn's metrics, over all ranks. An update
        whose loss or gradient norm is not finite is not applied (see `nonfinite`); the session's
        on_nonfinite policy decides what follows.
        """
        session, dist, runtime = self.session, self.session.dist, self.session.runtime
        totals: dict[str, torch.Tensor] = {}
        if dist.deepspeed is not None:  # the engine accumulates, clips and steps itself
            totals["loss"], grad_norm = dist.deepspeed.step(*batch)
            result = self._means(totals, grad_norm)
            if not self._finite(result):  # applied already: on_nonfinite="skip" is refused
                self.nonfinite = self.nonfinite or result
            return result
        if dist.pipeline is not None:  # the schedule runs every micro-batch through the stages
            totals["loss"] = dist.pipeline.step(*batch)
        else:
            micro_batches = batch if isinstance(batch, list) else cut_batch(batch, self.accum)
            n = len(micro_batches)
            for i, micro in enumerate(micro_batches):
                micro = to_device(micro, runtime.device)
                # Data-parallel gradients are reduced once, after the last micro-batch.
                with parallel.gradient_sync(self.model, i == n - 1), runtime.autocast():
                    loss, metrics = loss_fn(self.forward_model, micro)
                (loss / n).backward()
                for key, value in {"loss": loss, **metrics}.items():
                    value = torch.as_tensor(value, dtype=torch.float32, device=runtime.device)
                    totals[key] = totals.get(key, 0.0) + value.detach().float() / n
        grad_norm = parallel.clip_grad_norm_(self.model, session.cfg.grad_clip, dist)
        result = self._means(totals, grad_norm)
        # Every rank sees the same mean loss and global norm, so all skip or all step.
        if self._finite(result):
            self.optimizer.step()
        else:
            self.nonfinite = self.nonfinite or result
        self.optimizer.zero_grad(set_to_none=True)
        return result

    @staticmethod
    def _finite(result: dict[str, float]) -> bool:
        return math.isfinite(result["loss"]) and math.isfinite(result["grad_norm"])

    def _means(self, totals: dict[str, torch.Tensor], grad_norm: Any) -> dict[str, float]:
        """The metrics' means over ranks and the gradient norm, read in one transfer."""
        means = self.session.dist.mean(torch.stack(list(totals.values())).float())
        norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=means.device).reshape(1)
        values = torch.cat([means, norm]).tolist()
        return {**dict(zip(totals, values[:-1], strict=True)), "grad_norm": values[-1]}

    def eval_model(self, rows: int) -> nn.Module:
        """The model for evaluation forwards of up to `rows` rows (all stages under pipeline
        parallelism; the engine under DeepSpeed)."""
        dist = self.session.dist
        if dist.deepspeed is not None:
            return dist.deepspeed.engine
        if dist.pipeline is not None:
            cfg = self.config
            return dist.pipeline.whole_model(rows, cfg["max_seq_len"], cfg["vocab_size"])
        return self.model

    def part(self) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
        return self.model, self.optimizer, self.config


class Session:
    """One run of one stage: device, layout, metrics, signals, schedule and checkpoints.

    Creating it seeds torch and, with resume=True and a checkpoint in RUN/<stage>, reads that
    checkpoint; `trainer` then restores each model from it and `run` the rest.
    """

    def __init__(
        self,
        stage: str,
        run_dir: Path,
        cfg: TrainConfig,
        parallel_cfg: ParallelConfig,
        resume: bool = False,
        progress: bool = True,
        language_model_loss: bool = True,
    ) -> None:
        self.stage, self.run_dir, self.cfg, self.parallel_cfg = stage, run_dir, cfg, parallel_cfg
        self.progress = progress
        if not language_model_loss and (parallel_cfg.pp > 1 or parallel_cfg.engine != "torch"):
            raise UserError(
                f"{stage} runs on data-parallel and tensor-parallel layouts: set parallel.pp=1 "
                "and parallel.engine='torch'"
            )
        if cfg.on_nonfinite == "skip" and parallel_cfg.engine == "deepspeed":
            raise UserError(
                f"{stage}.on_nonfinite='skip' needs the update held back, which DeepSpeed's "
                "engine does not allow; use 'stop' with parallel.engine='deepspeed'"
            )
        self.runtime: Runtime = pick_runtime(cfg.device, cfg.precision)
        self.dist = parallel.init(parallel_cfg, self.runtime.device)
        self.stage_dir = run_dir / stage
        if self.dist.is_main:
            self._unlock = faults.take_run_folder(self, stage, run_dir, self.stage_dir)
        self.log = MetricsLog(run_dir / "metrics.jsonl", stage, enabled=self.dist.is_main)
        self.say(f"{stage}: {self.runtime.describe()}, {self.dist.describe()}")
        torch.manual_seed(cfg.seed)
        self.trainers: dict[str, Trainer] = {}
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.nonfinite = faults.NonFinitePolicy(stage, cfg)
        self.checkpoints = CheckpointManager(
            self.stage_dir,
            self.dist,
            parallel_cfg.engine,
            cfg.keep_checkpoints,
            plain_optimizer=lambda model: build_optimizer(model, cfg),
        )
        self.restored: Checkpoint | None = self.checkpoints.resume() if resume else None
        if self.restored is not None:
            state = self.restored.trainer_state
            self.step, self.tokens_seen = state["step"], state.get("tokens_seen", 0)
            self.elapsed_before = state.get("elapsed", 0.0)
            self.nonfinite.skipped_steps = state.get("skipped_steps", 0)
            self.say(f"{stage}: resumed from {self.restored.path} at step {self.step}")
        elif resume:
            self.say(f"{stage}: no checkpoint in {self.stage_dir} to resume from; starting at 0")
        if self.dist.is_main:  # rows logged after the checkpoint (or with no checkpoint) go;
            # a finished run resumed evaluates again, so its last evaluation goes too
            done = self.step >= cfg.max_steps or 0 < cfg.max_seconds <= self.elapsed_before
            after = self.step if resume else -1
            drop_rows(run_dir / "metrics.jsonl", stage, after, bool(self.restored and done))

    def close(self) -> None:
        """Let go of the run lock (the end of `run` does it)."""
        unlock = getattr(self, "_unlock", None)
        if unlock is not None:
            unlock()

    def say(self, *args: Any) -> None:
        if self.dist.is_main:
            print(*args, flush=True)

    def batch_layout(self, rows_per_step: int, micro_batch_size: int, unit: str = "rows") -> tuple:
        """(micro-batch rows, micro-batches per step) for each data-parallel rank's share of a
        global batch of `rows_per_step`. A micro-batch larger than the share shrinks to the
        largest size that divides it, with a note."""
        dp = self.dist.dp_size
        if rows_per_step % dp:
            raise UserError(
                f"{self.stage}: a step of {rows_per_step} {unit} does not split evenly over "
                f"{dp} data-parallel ranks"
            )
        share = rows_per_step // dp
        micro = max(d for d in range(1, min(micro_batch_size, share) + 1) if share % d == 0)
        if micro != micro_batch_size:
            self.say(
                f"note: {self.stage}.micro_batch_size={micro_batch_size} does not divide this "
                f"rank's {share} {unit} per step; using {micro}"
            )
        return micro, share // micro

    def trainer(
        self,
        model: nn.Module,
        batch: tuple[int, int] = (1, 1),
        name: str = "model",
        pipeline_loss: Callable | None = None,
    ) -> Trainer:
        """Restore `model` from the resumed checkpoint (if any), move and parallelise it, and give
        it an optimizer. `batch` is (micro-batch rows, micro-batches per step), as batch_layout
        gives it. `name` tells trained models of one stage apart; "model" is the stage's result.
        `pipeline_loss(logits, targets)` is needed under pipeline parallelism."""
        micro, accum = batch
        if self.parallel_cfg.engine == "deepspeed" and self.cfg.optimizer == "muon":
            raise UserError(
                f"{self.stage}.optimizer = 'muon' does not run under DeepSpeed, whose ZeRO "
                "flattens the matrices Muon orthogonalises; use parallel.engine = 'torch' (FSDP2)"
            )
        if name in self.trainers:
            raise ValueError(f"a trainer named {name!r} exists already")
        if (self.dist.pipeline is not None or self.dist.deepspeed is not None) and self.trainers:
            raise UserError(f"{self.stage} trains several models: pipeline and DeepSpeed train one")
        config = model.config.to_dict()

        def prepare(plain: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
            split = parallel.apply(
                plain, self.dist, self.parallel_cfg, self.runtime, accum, pipeline_loss
            )
            return split, build_optimizer(split, self.cfg, no_decay_names=self.dist.tied_copies)

        model, optimizer = self.checkpoints.restore(name, model, prepare)
        if self.parallel_cfg.engine == "deepspeed":  # DeepSpeed owns model and optimizer from here
            self.dist.deepspeed = DeepSpeedRunner(
                model, optimizer, self.parallel_cfg, self.cfg.grad_clip, self.runtime, micro, accum
            )
        trainer = Trainer(self, name, model, optimizer, config, batch)
        self.trainers[name] = trainer
        return trainer

    def save(self, stateful: dict[str, Any]) -> Path:
        """Checkpoint every trainer at the current step (collective under torchrun)."""
        trainer_state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed": round(time.time() - self._start, 3),
            "lr_factor": self._factor,
            "skipped_steps": self.nonfinite.skipped_steps,
            "rng": get_rng_state(),
            **{key: obj.state_dict() for key, obj in stateful.items()},
        }
        parts = {name: t.part() for name, t in self.trainers.items()}
        return self.checkpoints.save(self.step, trainer_state, parts)

    def run(
        self,
        train_step: Callable[[], dict[str, float]],
        evaluate: Callable[[], dict[str, float]],
        stateful: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Call train_step until max_steps (or max_seconds); log, evaluate and save on the way.

        train_step returns the step's metrics; a "tokens" entry (tokens in the global batch)
        becomes tokens_per_s and the running count. `stateful` objects (the data loader, ...)
        have state_dict/load_state_dict and are saved and restored with the checkpoint.
        """
        cfg, dist, stateful = self.cfg, self.dist, stateful or {}
        if self.restored is not None:
            state = self.restored.trainer_state
            for key, obj in stateful.items():
                obj.load_state_dict(state[key])
            set_rng_state(state["rng"])
        # The clock continues from the checkpoint, so a time budget spans a resume.
        self._start = time.time() - self.elapsed_before
        self._factor = lr_factor(self.step, cfg, elapsed=self.elapsed_before)
        if self.restored is not None:  # the factor of the last step taken, saved again as it was
            self._factor = self.restored.trainer_state.get("lr_factor", self._factor)
        last_val: dict[str, float] = {}
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not (self.progress and dist.is_main),
            dynamic_ncols=True,
            desc=self.stage,
        )
        for trainer in self.trainers.values():
            trainer.model.train()
        try:
            with StopSignals() as stop, faults.out_of_memory(self):
                while self.step < cfg.max_steps:
                    t0 = time.time()
                    # With a time budget, rank 0's clock drives the schedule and the stop.
                    elapsed = dist.from_rank0(t0 - self._start) if cfg.max_seconds else 0.0
                    if cfg.max_seconds and elapsed >= cfg.max_seconds:
                        self.say(
                            f"{self.stage}: reached max_seconds={cfg.max_seconds:g} "
                            f"at step {self.step}"
                        )
                        break
                    self._factor = lr_factor(self.step, cfg, elapsed=elapsed)
                    for trainer in self.trainers.values():
                        trainer.set_lr(self._factor)
                        trainer.nonfinite = None
                    metrics = train_step()
                    self.step += 1
                    bad = faults.nonfinite_updates(self.trainers.values(), metrics)
                    verdict = self.nonfinite.check(self.step, bad, self.stage_dir)
                    if verdict == "stop":
                        raise self.nonfinite.limit_reached(self.step, self.save(stateful))
                    if verdict == "skip":
                        self._log_skipped(metrics, bar)
                    else:
                        self._log_step(metrics, time.time() - t0, bar)
                    if (
                        cfg.eval_every
                        and self.step % cfg.eval_every == 0
                        and (self.step < cfg.max_steps)
                    ):
                        last_val = self._evaluate(evaluate, bar)
                    # Every rank stops at the same step: a signal may reach them at different times.
                    if (signum := dist.agree_stop(stop.signum)) is not None:
                        raise TrainingInterrupted(self.stage, signum, self.save(stateful))
                    if (
                        cfg.save_every
                        and self.step % cfg.save_every == 0
                        and (self.step < cfg.max_steps)
                    ):
                        self.save(stateful)
                bar.close()
                last_val = self._evaluate(evaluate, None)
            # A resume of a finished run takes no step: its last checkpoint stays as it was.
            unchanged = (
                self.restored is not None and self.step == self.restored.trainer_state["step"]
            )
            final = self.restored.path if unchanged else self.save(stateful)
        finally:  # also on a stop or an error: close the bar, leave the process group, unlock
            bar.close()
            parallel.shutdown(dist)
            self.close()
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "seconds": round(time.time() - self._start, 1),
            "checkpoint": str(final),
            "skipped_steps": self.nonfinite.skipped_steps,
            **last_val,
        }

    def _log_skipped(self, metrics: dict[str, float], bar: tqdm) -> None:
        tokens = metrics.pop("tokens", None)
        if tokens is not None:  # the batch was read: its tokens count as seen
            self.tokens_seen += int(tokens)
        # No "loss" key: plots of the loss leave the step out instead of drawing a NaN.
        self.log.write(
            self.step,
            skipped="non-finite",
            nonfinite_loss=str(metrics["loss"]),
            skipped_steps=self.nonfinite.skipped_steps,
            lr=self.cfg.lr * self._factor,
        )
        bar.update(1)

    def _log_step(self, metrics: dict[str, float], seconds: float, bar: tqdm) -> None:
        loss = metrics["loss"]
        row = {"loss": loss, "lr": self.cfg.lr * self._factor}
        tokens = metrics.pop("tokens", None)
        if tokens is not None:
            self.tokens_seen += int(tokens)
            row.update(tokens_per_s=round(tokens / seconds, 1), tokens=self.tokens_seen)
        self.log.write(self.step, **row, **{k: v for k, v in metrics.items() if k != "loss"})
        bar.update(1)
        shown = {"loss": f"{loss:.3f}"}
        if tokens is not None:
            shown["tok_s"] = f"{row['tokens_per_s']:,.0f}"
        bar.set_postfix(shown)

    def _evaluate(self, evaluate: Callable[[], dict], bar: tqdm | None) -> dict[str, float]:
        result = evaluate()
        self.log.write(self.step, **result)
        if bar is not None and self.dist.is_main:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
            bar.write(f"step {self.step}: {shown}")
        return result
