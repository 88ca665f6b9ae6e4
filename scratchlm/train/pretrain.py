"""The pretraining loop, top to bottom: data, model, optimizer, steps, evaluation, checkpoints."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from scratchlm import parallel
from scratchlm.config import Recipe
from scratchlm.errors import UserError
from scratchlm.evaluate.bpb import evaluate_bpb
from scratchlm.model import ModelConfig, Transformer, cross_entropy_loss
from scratchlm.shards import TokenLoader, check_tokenizer, read_meta
from scratchlm.tokenizer import Tokenizer
from scratchlm.train import checkpoint as ckpt
from scratchlm.train import distributed_checkpoint as dckpt
from scratchlm.train.checkpoint import load_weights
from scratchlm.train.deepspeed_engine import DeepSpeedRunner, warn_optimizer_restart
from scratchlm.train.device import pick_runtime
from scratchlm.train.metrics import MetricsLog, drop_rows
from scratchlm.train.optim import build_optimizer, lr_at
from scratchlm.train.rng import get_rng_state, set_rng_state


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint was saved. Carries the signal number."""

    def __init__(self, signum: int, saved: Path):
        super().__init__(f"stopped by signal {signum}; checkpoint saved to {saved}")
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


def model_config_from(recipe: Recipe) -> ModelConfig:
    m = recipe.model
    if m.dim % m.n_heads:
        raise UserError(f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads}")
    if m.n_heads % m.n_kv_heads:
        raise UserError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads")
    return ModelConfig(
        vocab_size=m.vocab_size,
        dim=m.dim,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads,
        max_seq_len=m.max_seq_len,
        ffn_dim=m.ffn_dim,
        norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        tie_embeddings=m.tie_embeddings,
    )


def grad_accum_steps(recipe: Recipe, dp_size: int) -> int:
    """Micro-batches per step on each rank, derived from the global batch in tokens."""
    p, seq = recipe.pretrain, recipe.model.max_seq_len
    per_pass = p.micro_batch_size * seq * dp_size
    if p.tokens_per_step % per_pass:
        raise UserError(
            f"pretrain.tokens_per_step={p.tokens_per_step} must be a multiple of "
            f"micro_batch_size x max_seq_len x data-parallel ranks = {per_pass}"
        )
    return p.tokens_per_step // per_pass


def pretrain(recipe: Recipe, run_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train from the run's token shards; returns the final figures. Rank 0 writes all files."""
    cfg = recipe.pretrain
    tokens_dir = run_dir / "tokens"
    meta = read_meta(tokens_dir)
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    check_tokenizer(meta, tokenizer)
    if meta["vocab_size"] > recipe.model.vocab_size:
        raise UserError(
            f"the tokenizer has {meta['vocab_size']} tokens but model.vocab_size is "
            f"{recipe.model.vocab_size}; retrain the tokenizer or raise model.vocab_size"
        )
    runtime = pick_runtime(cfg.device, cfg.precision)
    dist = parallel.init(recipe.parallel, runtime.device)
    stage_dir = run_dir / "pretrain"
    log = MetricsLog(run_dir / "metrics.jsonl", "pretrain", enabled=dist.is_main)
    say = print if dist.is_main else (lambda *a, **k: None)
    say(f"pretrain: {runtime.describe()}, {dist.describe()}")

    torch.manual_seed(cfg.seed)
    model_cfg = model_config_from(recipe)
    model = Transformer(model_cfg)
    say(f"pretrain: model {model.num_params() / 1e6:.2f}M parameters, {model_cfg.n_layers} layers")
    step, tokens_seen = 0, 0
    loader = TokenLoader(
        tokens_dir,
        "train",
        model_cfg.max_seq_len,
        global_batch=cfg.tokens_per_step // model_cfg.max_seq_len,
        dp_rank=dist.dp_rank,
        dp_size=dist.dp_size,
        seed=cfg.seed,
    )
    accum = grad_accum_steps(recipe, dist.dp_size)
    restored = None
    elapsed_before = 0.0
    if resume and ckpt.list_checkpoints(stage_dir):
        # A sharded checkpoint is read after the model is split; a single-file one before.
        restored = ckpt.load_checkpoint(stage_dir, consolidate=False)
        if restored.tensors:
            load_weights(model, restored.tensors)
        state = restored.trainer_state
        step, tokens_seen = state["step"], state["tokens_seen"]
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        elapsed_before = state.get("elapsed", 0.0)
        if dist.is_main:  # rows logged after this checkpoint, before the stop, are logged again
            drop_rows(run_dir / "metrics.jsonl", "pretrain", after_step=step)
        say(f"pretrain: resumed from {restored.path} at step {step}")
    elif resume:
        say(f"pretrain: no checkpoint in {stage_dir} to resume from; starting at step 0")
    flops_per_token = model.flops_per_token(model_cfg.max_seq_len)
    n_params = model.num_params()
    model = parallel.apply(model, dist, recipe.parallel, runtime, accum, cross_entropy_loss)
    train_model = torch.compile(model) if cfg.compile else model
    optimizer = build_optimizer(model, cfg, no_decay_names=dist.tied_copies)
    if restored is not None:
        if dckpt.is_sharded(restored.path):
            dckpt.load_sharded(restored.path, model, optimizer)
        elif recipe.parallel.engine == "deepspeed":
            warn_optimizer_restart()
        elif (opt_state := restored.optimizer_state()) is not None:
            if dist.sharded:
                dckpt.load_full_optimizer_state(model, optimizer, opt_state, model_cfg, cfg)
            else:
                optimizer.load_state_dict(opt_state)
    if recipe.parallel.engine == "deepspeed":  # DeepSpeed owns the model and optimizer from here
        dist.deepspeed = DeepSpeedRunner(model, optimizer, recipe, runtime, accum)

    token_bytes = tokenizer.token_bytes()
    eval_model, eval_batch = model, cfg.micro_batch_size
    if dist.deepspeed is not None:
        eval_model = dist.deepspeed.engine
    if dist.pipeline is not None:  # evaluation runs through the stages too, at the training shape
        eval_batch = cfg.micro_batch_size * accum
        eval_model = dist.pipeline.whole_model(
            eval_batch, model_cfg.max_seq_len, model_cfg.vocab_size
        )

    def evaluate(at_step: int) -> dict[str, float]:
        result = evaluate_bpb(
            eval_model,
            tokens_dir,
            token_bytes,
            model_cfg.max_seq_len,
            eval_batch,
            cfg.eval_tokens,
            runtime,
        )
        log.write(at_step, **result)
        return result

    def save(at_step: int) -> Path:
        path = stage_dir / f"step-{at_step:06d}"
        trainer_state = {
            "step": at_step,
            "tokens_seen": tokens_seen,
            "elapsed": round(time.time() - start, 3),
            "loader": loader.state_dict(),
            "rng": get_rng_state(),
            "lr": lr,
        }
        if dist.sharded:  # every rank writes its own shards
            return dckpt.save_sharded(
                stage_dir,
                at_step,
                model,
                optimizer,
                model_cfg.to_dict(),
                trainer_state,
                dist,
                keep=cfg.keep_checkpoints,
            )
        deepspeed = dist.deepspeed
        with deepspeed.full_weights() if deepspeed else contextlib.nullcontext():
            if dist.is_main:
                path = ckpt.save_checkpoint(
                    stage_dir,
                    at_step,
                    ckpt.model_tensors(parallel.unwrap(model)),
                    model_cfg.to_dict(),
                    trainer_state,
                    None if deepspeed else optimizer.state_dict(),
                    keep=cfg.keep_checkpoints,
                )
        dist.barrier()
        return path

    def train_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """One optimizer step over this rank's part of the global batch: (mean loss, grad norm)."""
        if dist.deepspeed is not None:  # the engine accumulates, clips and steps itself
            return dist.deepspeed.step(x, y)
        if dist.pipeline is not None:  # the schedule runs every micro-batch through the stages
            loss_sum = dist.pipeline.step(x, y)
        else:
            loss_sum = torch.zeros((), device=runtime.device)
            for i, (micro_x, micro_y) in enumerate(
                zip(x.chunk(accum), y.chunk(accum), strict=True)
            ):
                micro_x = micro_x.to(runtime.device, non_blocking=True)
                micro_y = micro_y.to(runtime.device, non_blocking=True)
                # Data-parallel gradients are reduced once, after the last micro-batch.
                with dist.sync_gradients(i == accum - 1), runtime.autocast():
                    loss = cross_entropy_loss(train_model(micro_x), micro_y) / accum
                loss.backward()
                loss_sum += loss.detach()
        grad_norm = parallel.clip_grad_norm_(model, cfg.grad_clip, dist)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm

    # The clock continues from the checkpoint, so a time budget spans a resume.
    start = time.time() - elapsed_before
    lr = lr_at(step, cfg, elapsed=elapsed_before)
    last_val: dict[str, float] = {}
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        disable=not (progress and dist.is_main),
        dynamic_ncols=True,
        desc="pretrain",
    )
    model.train()
    try:
        with StopSignals() as stop:
            while step < cfg.max_steps:
                t0 = time.time()
                # With a time budget, rank 0's clock drives the schedule and the stop everywhere.
                elapsed = dist.from_rank0(t0 - start) if cfg.max_seconds else 0.0
                if cfg.max_seconds and elapsed >= cfg.max_seconds:
                    say(f"pretrain: reached max_seconds={cfg.max_seconds:g} at step {step}")
                    break
                lr = lr_at(step, cfg, elapsed=elapsed)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, grad_norm = train_step(*loader.next_batch())
                step += 1
                tokens_seen += cfg.tokens_per_step
                loss_value = dist.mean(loss_sum).item()
                if not math.isfinite(loss_value):
                    raise RuntimeError(f"loss is {loss_value} at step {step}; lower pretrain.lr")
                tokens_per_s = cfg.tokens_per_step / (time.time() - t0)
                log.write(
                    step,
                    loss=loss_value,
                    lr=lr,
                    tokens_per_s=round(tokens_per_s, 1),
                    grad_norm=float(grad_norm),
                    tokens=tokens_seen,
                )
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                    last_val = evaluate(step)
                    if dist.is_main:
                        bar.write(
                            f"step {step}: val_loss {last_val['val_loss']:.4f}, "
                            f"val_bpb {last_val['val_bpb']:.4f}"
                        )
                # Every rank stops at the same step: a signal may reach them at different times.
                if (signum := dist.agree_stop(stop.signum)) is not None:
                    raise TrainingInterrupted(signum, save(step))
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                    save(step)
        bar.close()
        last_val = evaluate(step)
        final = save(step)
    finally:  # also on a stop or an error: close the bar and leave the process group
        bar.close()
        parallel.shutdown(dist)
    seconds = time.time() - start
    result = {
        "step": step,
        "tokens_seen": tokens_seen,
        "seconds": round(seconds, 1),
        "checkpoint": str(final),
        "params": n_params,
        "flops_per_token": flops_per_token,
        **last_val,
    }
    say(
        f"pretrain: step {step}, val_loss {last_val['val_loss']:.4f}, "
        f"val_bpb {last_val['val_bpb']:.4f}, {seconds:.0f} s"
    )
    return result
