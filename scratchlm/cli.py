"""The `scratchlm` command: one subcommand per stage. Parsing only; the work lives in the stages.

Exit codes: 0 done, 2 a user mistake (one line on stderr), 1 anything else, 128+N after signal N
(a checkpoint was saved first).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from scratchlm.errors import UserError

DEFAULT_RECIPE = "recipes/tiny.toml"


def _add_recipe_args(p: argparse.ArgumentParser, run_dir_required: bool = True) -> None:
    p.add_argument(
        "recipe",
        nargs="?",
        help=f"TOML recipe (default: RUN_DIR/recipe.toml, else {DEFAULT_RECIPE})",
    )
    p.add_argument("--run-dir", type=Path, required=run_dir_required, help="the run folder")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe key (the value parses as TOML)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchlm",
        description="Build a language model from scratch. Each stage is a subcommand; "
        "`scratchlm pipeline` runs them all in order.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="run every stage in order, skipping those up to date")
    _add_recipe_args(p)
    p.add_argument("--until", help="stop after this stage")

    p = sub.add_parser(
        "curate",
        help="raw text to clean documents",
        description="scratchlm curate INPUT... --out DIR, or as a stage: "
        "scratchlm curate [RECIPE] --run-dir DIR. "
        "Also: scratchlm curate train-quality --positive P... --negative N... "
        "--out model.bin",
    )
    p.add_argument("inputs", nargs="*", help="files, folders or globs (or a recipe with --run-dir)")
    p.add_argument("--out", type=Path, help="output folder for plain inputs")
    p.add_argument("--run-dir", type=Path, help="run the stage of this run folder")
    p.add_argument("--recipe", help="recipe whose [curate] section to use")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--only", help="run only these steps (comma-separated)")

    for name, help_text in [
        ("tokenizer", "train the byte-level BPE tokenizer on the curated documents"),
        ("tokenize", "tokenize the curated documents into token shards"),
        ("pretrain", "pretrain the model on the token shards"),
        ("eval", "validation bits-per-byte and samples of the newest checkpoint"),
        ("report", "write report.html"),
    ]:
        p = sub.add_parser(name, help=help_text)
        _add_recipe_args(p)
        if name == "pretrain":
            p.add_argument(
                "--resume",
                action="store_true",
                help="continue from the newest checkpoint in RUN_DIR/pretrain",
            )

    p = sub.add_parser("generate", help="sample text from a trained model")
    p.add_argument("path", type=Path, help="run folder or checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("export", help="write the model in another format")
    p.add_argument("path", type=Path, help="run folder or checkpoint")
    p.add_argument("--format", choices=["hf"], required=True)
    p.add_argument("--out", type=Path, required=True)
    return parser


def _recipe(args: argparse.Namespace, must_exist: bool = True):
    from scratchlm.config import load_recipe, save_recipe

    run_dir: Path = args.run_dir
    if must_exist and not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    path = args.recipe
    if path is None:
        path = run_dir / "recipe.toml" if (run_dir / "recipe.toml").is_file() else DEFAULT_RECIPE
    recipe = load_recipe(Path(path), args.set)
    if int(os.environ.get("RANK", "0")) == 0:
        save_recipe(recipe, run_dir / "recipe.toml")
    return recipe


def _curate(argv: list[str]) -> int:
    if argv[:1] == ["train-quality"]:
        return _train_quality(argv[1:])
    args = build_parser().parse_args(["curate", *argv])
    from scratchlm.curate.pipeline import run_curate

    only = args.only.split(",") if args.only else None
    if args.run_dir is not None:
        args.recipe = args.recipe or (args.inputs[0] if args.inputs else None)
        recipe = _recipe(args, must_exist=False)
        run_curate(recipe.data.inputs, args.run_dir / "curated", recipe.curate, only=only)
        return 0
    if not args.inputs or args.out is None:
        raise UserError("curate needs INPUT... --out DIR (or --run-dir DIR)")
    from scratchlm.config import load_recipe

    recipe = load_recipe(Path(args.recipe) if args.recipe else None, args.set)
    run_curate(args.inputs, args.out, recipe.curate, only=only)
    return 0


def _train_quality(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="scratchlm curate train-quality",
        description="train the fastText quality classifier: reference text against raw web text",
    )
    p.add_argument("--positive", nargs="+", required=True, help="high-quality inputs")
    p.add_argument("--negative", nargs="+", required=True, help="low-quality inputs")
    p.add_argument("--out", type=Path, required=True, help="where to write model.bin")
    p.add_argument("--text-separator", default="", help="split plain text files on this")
    args = p.parse_args(argv)
    from scratchlm.curate.quality import train_quality

    result = train_quality(
        args.positive, args.negative, args.out, text_separator=args.text_separator
    )
    print(
        f"quality classifier: held-out accuracy {result['accuracy']:.3f} "
        f"(precision {result['precision']:.3f}, recall {result['recall']:.3f}, "
        f"{result['n_valid']} held-out examples); wrote {result['model']}"
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from scratchlm.infer.stream import stream_to_terminal

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
    from scratchlm.export.hf import export_run

    out = export_run(args.path, args.out)
    print(f"export: wrote {out}")
    return 0


def dispatch(argv: list[str]) -> int:
    if argv[:1] == ["curate"]:
        return _curate(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command == "export":
        return _export(args)
    from scratchlm import pipeline

    if args.command == "pipeline":
        args.run_dir.mkdir(parents=True, exist_ok=True)
        results = pipeline.run_pipeline(_recipe(args), args.run_dir, until=args.until)
        if "eval" in results:
            ev = results["eval"]
            print(f"\nvalidation bits per byte: {ev['val_bpb']:.4f}")
            for s in ev["samples"]:
                print(f"\n--- {s['prompt']}{s['completion']}")
        if "report" in results:
            print(f"\nreport: {results['report']['report']}")
        return 0
    recipe = _recipe(args)
    if args.command == "pretrain":
        pipeline.run_pretrain(recipe, args.run_dir, resume=args.resume)
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from scratchlm.train.loop import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            print(f"{e.stage}: {e}; continue with --resume", file=sys.stderr)
            return 128 + e.signum
        raise
