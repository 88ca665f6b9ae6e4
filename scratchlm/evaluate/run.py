"""`scratchlm eval`: a run's newest checkpoint on the validation split, plus samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from scratchlm.config import Recipe
from scratchlm.device import pick_runtime
from scratchlm.evaluate.bpb import evaluate_bpb
from scratchlm.infer.generate import generate
from scratchlm.loading import from_checkpoint, latest_checkpoint_dir
from scratchlm.shards import check_tokenizer, read_meta
from scratchlm.train.checkpoint import load_checkpoint


def sample_texts(model: torch.nn.Module, tokenizer: Any, recipe: Recipe, device: Any) -> list[dict]:
    s = recipe.sample
    samples = []
    for i, prompt in enumerate(s.prompts):
        ids = tokenizer.encode(prompt, add_bos=True)
        new = list(
            generate(
                model,
                ids,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                seed=s.seed + i,
                stop_ids=(tokenizer.eos_id,),
            )
        )
        samples.append({"prompt": prompt, "completion": tokenizer.decode(new, skip_special=True)})
    return samples


def evaluate_run(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    # Read and verified once: the manifest check hashes every file of the checkpoint.
    loaded = load_checkpoint(latest_checkpoint_dir(run_dir))
    ckpt = loaded.path
    runtime = pick_runtime(recipe.pretrain.device, recipe.pretrain.precision)
    model, tokenizer = from_checkpoint(loaded, device=runtime.device)
    check_tokenizer(read_meta(run_dir / "tokens"), tokenizer)
    figures = evaluate_bpb(
        model,
        run_dir / "tokens",
        tokenizer.token_bytes(),
        model.config.max_seq_len,
        recipe.pretrain.micro_batch_size,
        # The whole validation split (up to 4M tokens), not the trainer's quick estimate.
        max_tokens=4_000_000,
        runtime=runtime,
    )
    result = {
        "checkpoint": str(ckpt),
        "stage": ckpt.parent.name,
        "step": json.loads((ckpt / "trainer_state.json").read_text())["step"],
        **figures,
        "samples": sample_texts(model, tokenizer, recipe, runtime.device),
    }
    out = run_dir / "eval" / f"{ckpt.parent.name}-{ckpt.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    (run_dir / "eval" / "results.json").write_text(json.dumps(result, indent=2))
    print(f"eval: {ckpt}: val_loss {figures['val_loss']:.4f}, val_bpb {figures['val_bpb']:.4f}")
    for s in result["samples"]:
        print(f"--- sample: {s['prompt']}{s['completion']}")
    return result
