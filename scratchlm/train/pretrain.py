"""Pretraining: next-token prediction on the run's token shards, on the one training loop.

This file holds only what is particular to pretraining: the model built from the recipe's [model]
section (or started from `pretrain.init_from`), the token loader, the cross-entropy loss and the
validation bits-per-byte. train/loop.py does the rest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scratchlm.config import Recipe
from scratchlm.errors import UserError
from scratchlm.evaluate.bpb import evaluate_bpb
from scratchlm.evaluate.run import check_task_names, in_loop_scores
from scratchlm.loading import load_model
from scratchlm.model import ModelConfig, Transformer, cross_entropy_loss
from scratchlm.shards import TokenLoader, check_tokenizer, read_meta
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.loop import Session


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


def initial_model(recipe: Recipe, say) -> Transformer:
    """A fresh model of the recipe's [model] section, or the one pretrain.init_from names."""
    if not recipe.pretrain.init_from:
        return Transformer(model_config_from(recipe))
    model, source = load_model(Path(recipe.pretrain.init_from))
    say(f"pretrain: starting from the weights of {source} (its architecture, not [model]'s)")
    return model.train()


def lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    inputs, targets = batch
    return cross_entropy_loss(model(inputs), targets), {}


def pretrain(recipe: Recipe, run_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train from the run's token shards; returns the final figures. Rank 0 writes all files."""
    cfg = recipe.pretrain
    tokens_dir = run_dir / "tokens"
    meta = read_meta(tokens_dir)
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    check_tokenizer(meta, tokenizer)
    check_task_names(cfg.eval_tasks)
    session = Session("pretrain", run_dir, cfg, recipe.parallel, resume, progress)
    model = initial_model(recipe, session.say)
    model_cfg = model.config
    if meta["vocab_size"] > model_cfg.vocab_size:
        raise UserError(
            f"the tokenizer has {meta['vocab_size']} tokens but the model's vocab_size is "
            f"{model_cfg.vocab_size}; retrain the tokenizer or raise model.vocab_size"
        )
    seq = model_cfg.max_seq_len
    if cfg.tokens_per_step % seq:
        raise UserError(
            f"pretrain.tokens_per_step={cfg.tokens_per_step} must be a multiple of "
            f"max_seq_len={seq}"
        )
    global_rows = cfg.tokens_per_step // seq
    session.say(
        f"pretrain: model {model.num_params() / 1e6:.2f}M parameters, {model_cfg.n_layers} layers"
    )
    micro, accum = batch = session.batch_layout(global_rows, cfg.micro_batch_size, "sequences")
    loader = TokenLoader(
        tokens_dir,
        "train",
        seq,
        global_batch=global_rows,
        dp_rank=session.dist.dp_rank,
        dp_size=session.dist.dp_size,
        seed=cfg.seed,
    )
    flops_per_token, n_params = model.flops_per_token(seq), model.num_params()
    trainer = session.trainer(model, batch, pipeline_loss=cross_entropy_loss)
    # Under pipeline parallelism evaluation runs through the stages at the training shape.
    eval_rows = micro * accum if session.dist.pipeline is not None else micro
    token_bytes = tokenizer.token_bytes()

    # Benchmark tasks score the whole model; under pipeline parallelism no rank holds it.
    task_names = cfg.eval_tasks if session.dist.pipeline is None else []
    if cfg.eval_tasks and not task_names:
        session.say("pretrain: pretrain.eval_tasks are skipped under pipeline parallelism")

    def evaluate() -> dict[str, float]:
        model = trainer.eval_model(eval_rows)
        figures = evaluate_bpb(
            model, tokens_dir, token_bytes, seq, eval_rows, cfg.eval_tokens, session.runtime
        )
        scores = in_loop_scores(
            trainer.model, tokenizer, task_names, cfg.eval_tasks_limit, session.runtime
        )
        return {**figures, **scores}

    def train_step() -> dict[str, float]:
        return {**trainer.step(loader.next_batch(), lm_loss), "tokens": cfg.tokens_per_step}

    result = session.run(train_step, evaluate, {"loader": loader})
    session.say(
        f"pretrain: step {result['step']}, val_loss {result['val_loss']:.4f}, "
        f"val_bpb {result['val_bpb']:.4f}, {result['seconds']:.0f} s"
    )
    return {**result, "params": n_params, "flops_per_token": flops_per_token}
