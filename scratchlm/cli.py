"""The `scratchlm` command: one subcommand per stage. Parsing only; the work lives in the stages.

Exit codes: 0 done, 2 a user mistake (one line on stderr), 1 anything else (a fault of the run,
such as a full disk, is one line too), 128+N after signal N (a checkpoint was saved first).

A command that writes into a run folder holds its lock (RUN/.lock) from before its first write;
read-only commands do not take it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from scratchlm.errors import RunFault, UserError

DEFAULT_RECIPE = "recipes/tiny.toml"


def _add_recipe_args(p: argparse.ArgumentParser, run_dir_required: bool = True) -> None:
    p.add_argument(
        "recipe",
        nargs="?",
        help=f"TOML recipe (default: RUN_DIR/recipe.toml, else {DEFAULT_RECIPE})",
    )
    p.add_argument("--run-dir", type=Path, required=run_dir_required, help="the run folder")
    _add_set_arg(p)


def _add_set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe key (the value parses as TOML)",
    )


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help="longest answer in tokens (default: %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="0: greedy; higher: more varied (default: %(default)s)",
    )
    p.add_argument(
        "--top-k", type=int, default=50, help="sample from the K likeliest tokens; 0: all"
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=0.95,
        help="sample from the likeliest tokens whose probabilities reach P (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=None, help="make the sampling repeatable")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")


def _add_executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="run the tasks as local processes or on a Ray cluster (default: curate.executor)",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the Ray cluster: auto, or HOST:PORT (default: curate.ray_address; empty starts one)",
    )


def _apply_executor_args(curate, args: argparse.Namespace) -> None:
    if args.executor is not None:
        curate.executor = args.executor
    if args.ray_address is not None:
        curate.ray_address = args.ray_address


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchlm",
        description="Build a language model from scratch. Each stage is a subcommand; "
        "`scratchlm pipeline` runs them all in order.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="run every stage in order, skipping those up to date")
    _add_recipe_args(p)
    p.add_argument("--until", help="stop after this stage (curate, tokenizer, ..., eval, report)")

    p = sub.add_parser(
        "curate",
        help="raw text to clean documents",
        description="scratchlm curate INPUT... --out DIR, or as a stage: "
        "scratchlm curate [RECIPE] --run-dir DIR. "
        "Also: scratchlm curate train-quality --positive P... --negative N... "
        "--out model.bin",
    )
    p.add_argument("inputs", nargs="*", help="files, folders or globs (or a recipe with --run-dir)")
    p.add_argument("--out", help="output folder (or fsspec URL, e.g. s3://bucket/out)")
    p.add_argument("--run-dir", type=Path, help="run the stage of this run folder")
    p.add_argument("--recipe", help="recipe whose [curate] section to use")
    _add_set_arg(p)
    p.add_argument("--only", help="run only these steps (comma-separated)")
    _add_executor_args(p)

    for name, help_text in [
        ("tokenizer", "train the byte-level BPE tokenizer on the curated documents"),
        ("tokenize", "tokenize the curated documents into token shards"),
        ("pretrain", "pretrain the model on the token shards"),
        ("report", "write report.html"),
    ]:
        p = sub.add_parser(name, help=help_text)
        _add_recipe_args(p)
        if name == "tokenize":
            _add_executor_args(p)
        if name == "pretrain":
            p.add_argument(
                "--resume",
                action="store_true",
                help="continue from the newest checkpoint in RUN_DIR/pretrain",
            )

    _add_eval_parser(sub)
    for name, help_text in [
        ("sft", "supervised fine-tuning on chat data, from the pretrained model"),
        ("reward", "train the reward model on preference pairs, from the SFT model"),
        ("dpo", "direct preference optimisation, from the SFT model"),
        ("ppo", "PPO against the reward model, from the SFT model"),
        ("grpo", "GRPO against a reward function, from the SFT model"),
    ]:
        p = sub.add_parser(name, help=help_text)
        _add_recipe_args(p)
        p.add_argument(
            "--resume",
            action="store_true",
            help=f"continue from the newest checkpoint in RUN_DIR/{name}",
        )

    p = sub.add_parser(
        "generate",
        help="sample text from a trained model",
        description="Continue a prompt with a trained model. A run folder gives its last stage "
        "with a checkpoint (ppo, grpo, dpo, sft, then pretrain; the line on stderr names it); "
        "give a stage or checkpoint folder to choose another.",
    )
    p.add_argument("path", type=Path, help="run folder, stage folder or checkpoint")
    p.add_argument("--prompt", required=True, help="the text to continue")
    _add_sampling_args(p, max_new_tokens=200)

    p = sub.add_parser(
        "chat",
        help="talk to a model in the terminal",
        description="A conversation with a model through its chat template; a run folder gives "
        "its last stage with a checkpoint (the line on stderr names it).",
    )
    p.add_argument("path", type=Path, help="run folder, stage folder or checkpoint")
    p.add_argument("--system", default="", help="the system prompt")
    _add_sampling_args(p, max_new_tokens=256)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server and a chat page")
    p.add_argument("path", type=Path, help="run folder or checkpoint")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default: %(default)s)"
    )
    p.add_argument("--api-key", default=None, help="clients must send 'Authorization: Bearer KEY'")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoding at once")
    p.add_argument("--cache-tokens", type=int, default=None, help="KV cache size in tokens")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--model-name", default=None, help="the model id (default: the folder name)")
    p.add_argument("--drain-seconds", type=float, default=30.0, help="SIGTERM grace period")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")

    p = sub.add_parser("export", help="write the model in another format")
    p.add_argument("path", type=Path, help="run folder or checkpoint")
    p.add_argument(
        "--format",
        choices=["hf", "gguf"],
        required=True,
        help="hf: a Hugging Face Llama folder; gguf: one file for llama.cpp",
    )
    p.add_argument("--out", type=Path, required=True, help="the folder (hf) or .gguf file to write")
    p.add_argument(
        "--dtype", choices=["f32", "f16", "q8_0"], default="f16", help="GGUF tensor type"
    )

    p = sub.add_parser("import-hf", help="a Hugging Face Llama checkpoint as a scratchlm run")
    p.add_argument("hf_dir", type=Path, help="folder with config.json, safetensors, tokenizer.json")
    p.add_argument("--run-dir", type=Path, required=True, help="the run folder to write")
    return parser


def _add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="benchmark scores, validation bits-per-byte and samples of a checkpoint",
        description="scratchlm eval RUN_OR_CHECKPOINT [--tasks hellaswag,arc_easy,...], or as a "
        "stage: scratchlm eval [RECIPE] --run-dir DIR (the recipe's eval.tasks, the validation "
        "split and samples). Results go to RUN/eval/<stage>-<step>.json and RUN/eval/results.json; "
        "with settings other than the run's [eval] (--limit, --shots, --data...), to "
        "RUN/eval/<stage>-<step>.<settings>.json, which the report does not show.",
    )
    p.add_argument(
        "target", nargs="?", help="run folder or checkpoint (or a recipe with --run-dir)"
    )
    p.add_argument("--run-dir", type=Path, help="the run folder (stage form)")
    _add_set_arg(p)
    p.add_argument("--tasks", help="comma-separated task names (default: the recipe's eval.tasks)")
    p.add_argument("--data", help="read the one task given from this file (same layout)")
    p.add_argument("--data-dir", help="folder of the task files (default: eval.data_dir)")
    p.add_argument("--shots", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=int, help="only the first N examples of each task")
    p.add_argument("--batch-size", type=int, help="rows per forward pass")
    p.add_argument("--chat", action="store_true", help="prompt through the chat template")
    p.add_argument("--harness", action="store_true", help="run the tasks in lm-evaluation-harness")
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (default: pretrain.device)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the scores")
    p.add_argument(
        "--write-harness-tasks",
        type=Path,
        metavar="DIR",
        help="write the scratchlm_* lm-evaluation-harness task files for --data-dir into DIR",
    )


def _eval(args: argparse.Namespace) -> int:
    from scratchlm.evaluate.command import eval_command

    return eval_command(args)


def _recipe(args: argparse.Namespace, must_exist: bool = True):
    """The recipe of a stage command, validated; nothing is written (see _save_recipe)."""
    from scratchlm.config import load_recipe

    run_dir: Path = args.run_dir
    if must_exist and not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    path = args.recipe
    if path is None:
        path = run_dir / "recipe.toml" if (run_dir / "recipe.toml").is_file() else DEFAULT_RECIPE
    return load_recipe(Path(path), args.set)


def _save_recipe(recipe, run_dir: Path) -> None:
    """RUN/recipe.toml, once the command has passed its checks and holds the run folder."""
    from scratchlm.config import save_recipe

    if int(os.environ.get("RANK", "0")) == 0:
        save_recipe(recipe, run_dir / "recipe.toml")


def _take_run_folder(folder: Path, argv: list[str], what: str = "run folder") -> None:
    """Before the first write: the folder must be writable and not in use by another process;
    what an interrupted run left half-written in it goes. Under torchrun, rank 0 does this."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from scratchlm import disk, runlock

    disk.check_writable(folder, what)
    runlock.acquire(folder, command=" ".join(["scratchlm", *argv]))
    disk.say_removed(argv[0], *disk.remove_stale(folder, [".tmp-*"]))


def _curate(argv: list[str]) -> int:
    if argv[:1] == ["train-quality"]:
        return _train_quality(argv[1:])
    args = build_parser().parse_args(["curate", *argv])
    from scratchlm.curate.pipeline import run_curate
    from scratchlm.pipeline import curate_summary

    only = args.only.split(",") if args.only else None
    if args.run_dir is not None:
        args.recipe = args.recipe or (args.inputs[0] if args.inputs else None)
        recipe = _recipe(args, must_exist=False)
        _apply_executor_args(recipe.curate, args)
        from scratchlm.preflight import check_curate

        check_curate(recipe)
        _take_run_folder(args.run_dir, ["curate", *argv])
        _save_recipe(recipe, args.run_dir)
        stats = run_curate(recipe.data.inputs, args.run_dir / "curated", recipe.curate, only=only)
        print(curate_summary(stats))
        return 0
    if not args.inputs or args.out is None:
        raise UserError("curate needs INPUT... --out DIR (or --run-dir DIR)")
    from scratchlm.config import load_recipe

    recipe = load_recipe(Path(args.recipe) if args.recipe else None, args.set)
    _apply_executor_args(recipe.curate, args)
    out = str(args.out) if "://" in args.out else Path(args.out)
    if isinstance(out, Path):  # object storage has no folder to lock
        _take_run_folder(out, ["curate", *argv], what="output folder")
    print(curate_summary(run_curate(args.inputs, out, recipe.curate, only=only)))
    return 0


def build_train_quality_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scratchlm curate train-quality",
        description="train the fastText quality classifier: reference text against raw web text",
    )
    p.add_argument("--positive", nargs="+", required=True, help="high-quality inputs")
    p.add_argument("--negative", nargs="+", required=True, help="low-quality inputs")
    p.add_argument("--out", type=Path, required=True, help="where to write model.bin")
    p.add_argument("--text-separator", default="", help="split plain text files on this")
    return p


def _train_quality(argv: list[str]) -> int:
    args = build_train_quality_parser().parse_args(argv)
    from scratchlm import disk
    from scratchlm.curate.quality import train_quality

    disk.check_writable(args.out.parent, "output folder")

    result = train_quality(
        args.positive, args.negative, args.out, text_separator=args.text_separator
    )
    print(
        f"quality classifier: held-out accuracy {result['accuracy']:.3f} "
        f"(precision {result['precision']:.3f}, recall {result['recall']:.3f}, "
        f"{result['n_valid']} held-out examples); wrote {result['model']}"
    )
    return 0


def _check_sampling_args(args: argparse.Namespace) -> None:
    """The sampling options in their ranges, before a model is loaded (one line naming the
    option)."""
    for option, value, ok, accepted in [
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 0, "an integer >= 0"),
        ("--temperature", args.temperature, 0 <= args.temperature < math.inf, "a number >= 0"),
        ("--top-k", args.top_k, args.top_k >= 0, "an integer >= 0 (0: all tokens)"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "a number in (0, 1]"),
        (
            "--seed",
            args.seed,
            args.seed is None or -(2**63) <= args.seed < 2**64,
            "a 64-bit integer",
        ),
    ]:
        if not ok:
            raise UserError(f"{option} {value}: expected {accepted}")


def _generate(args: argparse.Namespace) -> int:
    from scratchlm.infer.stream import stream_to_terminal

    _check_sampling_args(args)

    stream_to_terminal(
        args.path,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        device=args.device,
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from scratchlm import disk

    if args.format == "gguf":
        from scratchlm.export.gguf import export_gguf_run

        disk.check_writable(args.out.parent, "export folder")
        out = export_gguf_run(args.path, args.out, args.dtype)
    else:
        from scratchlm.export.hf import export_run

        disk.check_writable(args.out, "export folder")
        out = export_run(args.path, args.out)
    print(f"export: wrote {out}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from scratchlm.infer.chat import chat_in_terminal

    _check_sampling_args(args)

    chat_in_terminal(
        args.path,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        device=args.device,
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from scratchlm.serve.server import serve

    serve(
        args.path,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch=args.max_batch,
        cache_tokens=args.cache_tokens,
        max_queue=args.max_queue,
        model_name=args.model_name,
        device=args.device,
        drain_seconds=args.drain_seconds,
    )
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from scratchlm.export.hf_import import read_hf_checkpoint, write_imported_run

    imported = read_hf_checkpoint(args.hf_dir)  # checked whole before the run folder is touched
    _take_run_folder(args.run_dir, ["import-hf", str(args.hf_dir), "--run-dir", str(args.run_dir)])
    checkpoint = write_imported_run(imported, args.run_dir)
    print(f"import-hf: wrote {checkpoint} and {args.run_dir / 'tokenizer.json'}")
    return 0


# Commands that only read a run folder (they run beside a training that holds its lock), and
# import-hf, which takes its folder once the checkpoint it reads has passed its checks.
COMMANDS = {
    "export": _export,
    "chat": _chat,
    "serve": _serve,
    "import-hf": _import_hf,
    "eval": _eval,
}


def _print_answers(results: dict) -> None:
    """Each aligned stage's answers to the recipe's align.prompts, prompt by prompt."""
    stages = [s for s, r in results.items() if isinstance(r, dict) and r.get("answers")]
    if not stages:
        return
    for i, row in enumerate(results[stages[0]]["answers"]):
        print(f"\n>>> {row['prompt']}")
        for stage in stages:
            answers = results[stage]["answers"]
            if i < len(answers):
                print(f"[{stage}] {answers[i]['answer']}")


def dispatch(argv: list[str]) -> int:
    if argv[:1] == ["curate"]:
        return _curate(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command in COMMANDS:
        return COMMANDS[args.command](args)
    from scratchlm import pipeline, preflight

    # Everything is checked before the first write: a refused command leaves the run as it was.
    recipe = _recipe(args, must_exist=args.command != "pipeline")
    if args.command == "pipeline":
        preflight.check_pipeline(recipe, pipeline.run_stages(recipe), args.until)
    else:
        preflight.check_stage(args.command, recipe, args.run_dir)
    if args.command == "tokenize":
        _apply_executor_args(recipe.curate, args)
    _take_run_folder(args.run_dir, argv)
    _save_recipe(recipe, args.run_dir)
    if args.command == "pipeline":
        results = pipeline.run_pipeline(recipe, args.run_dir, until=args.until)
        if "eval" in results:
            ev = results["eval"]
            print(f"\nvalidation bits per byte: {ev['val_bpb']:.4f}")
            for s in ev["samples"]:
                print(f"\n--- {s['prompt']}{s['completion']}")
        _print_answers(results)
        if "report" in results:
            print(f"\nreport: {results['report']['report']}")
        return 0
    if args.command == "pretrain":
        pipeline.run_pretrain(recipe, args.run_dir, resume=args.resume)
    elif args.command in pipeline.ALIGN_STAGES:
        pipeline.run_align_stage(args.command, recipe, args.run_dir, resume=args.resume)
    else:
        pipeline.RUNNERS[args.command](recipe, args.run_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return dispatch(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFault as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from scratchlm.train.loop import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            print(f"{e.stage}: {e}; continue with --resume", file=sys.stderr)
            return 128 + e.signum
        if type(e).__name__ == "OutOfMemoryError":  # torch's, outside the training loop
            first = str(e).splitlines()[0] if str(e) else "out of memory"
            print(
                f"error: {first}; use a smaller model or micro_batch_size, or more GPUs",
                file=sys.stderr,
            )
            return 1
        raise
