"""Every script in bench/ runs end to end in its quick mode, as README gives the commands
(`python bench/X.py --quick --json` from the repository root), so that none can break unseen: the
figures are not asserted (they depend on the machine), the keys of the JSON line and the facts
that hold at any speed are. And no module in bench/ or tests/ takes the name of an installed
package: a script's folder leads sys.path, so bench/kernels.py once hid the `kernels` package that
transformers imports, and every bench command failed on a fresh install."""

import importlib.metadata
import importlib.util
import json
import math
import os
import site
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT

BENCH = ROOT / "bench"
TESTS = ROOT / "tests"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))

# Each bench's --json keys: those of its full run, which README's and docs' figures come from.
PPO_KEYS = {
    "ppo_prompts", "sft_mean_reward", "ppo_mean_reward", "sft_end_rate", "ppo_end_rate",
    "ppo_win_rate", "ppo_win_rate_ci95", "ppo_kl", "ppo_steps", "ppo_rollout_tokens_per_s",
    "ppo_train_tokens_per_s", "ppo_generate_share", "threads",
}  # fmt: skip
KEYS: dict[str, set[str]] = {
    "align.py": PPO_KEYS | {
        "sft_eot_rate", "sft_eot_ci95", "sft_instructions", "sft_mean_answer_tokens",
        "sft_val_loss", "sft_val_chats", "rm_accuracy", "rm_ci95", "rm_pairs",
        "length_baseline_accuracy", "length_baseline_ci95", "rm_from_pretrained_accuracy",
        "rm_from_pretrained_ci95", "seconds",
    },
    "align_rl.py": PPO_KEYS,
    "compiled_kernels.py": {
        "preset", "threads", "load_average", "ms_per_step", "compile_seconds",
        "custom_op_faster_under_compile",
    },
    "curate.py": {
        *(f"{kind}{n}_{unit}" for kind in ("local", "ray") for n in (1, 2)
          for unit in ("docs_per_s", "mb_per_s")),
        "ray_overhead", "step_docs_per_cpu_s", "step_seconds", "docs_in", "speedup_vs_datatrove",
        "kept_agreement_vs_datatrove", "datatrove_docs_per_s", "scratchlm_docs_per_s_jsonl",
        "kept", "differences",
    },
    "datatrove_curate.py": {"docs", "workers", "wall_s", "docs_per_s", "kept", "removed"},
    "dedup.py": {
        "docs", "bands", "rows", "threshold", "positives", "precision", "recall", "docs_per_s",
        "speedup_vs_datasketch", "lsh_only_precision", "lsh_only_recall", "lsh_only_docs_per_s",
        "datasketch_precision", "datasketch_recall", "datasketch_docs_per_s",
        "speedup_vs_datasketch_verified",
    },
    "eval.py": {
        "path", "limit", "data_dir", "machine", "max_abs_diff_points", "max_relative_diff",
        "max_abs_diff_points_hf", "speedup_vs_harness", "speedup_vs_harness_model_time",
        "speedup_vs_harness_cpu_time", "speedup_vs_harness_scoring", "seconds",
        "harness_hf_seconds", "tasks",
    },
    "faults.py": {"faults", "failed"},
    "gpu.py": {"device", "optimizer", "results", "ratios"},
    "memory.py": {"results"},
    "quality_per_time.py": {
        "val_bpb", "seconds", "anchor_val_bpb", "budget_seconds", "anchor", "muon", "adamw",
    },
    "scale.py": {"machine", "torch", "results"},
    "serve.py": {
        "decode_ratio_vs_transformers", "aggregate_speedup_32_vs_1", "engine_speedup_32_vs_1",
        "decode", "serve", "llama_cpp_tok_s", "threads",
    },
    "sweep.py": {"side", "ref_steps", "results"},
    "tokenizer.py": {"machine", "corpus_mb", "tokens", "vocab_size", "rows"},
    "train_throughput.py": {
        "preset", "device", "threads", "precision", "batch", "seq_len", "steps", "load_average",
        "matmul_tflops", "models", "ratio_vs_transformers", "ratio_best_steps", "mfu",
    },
}  # fmt: skip

# The peer side of curate.py's comparison is datatrove, a bench-only requirement that no make
# target installs: these run under a Python that has it (the datatrove_python fixture).
NEEDS_DATATROVE = {"curate.py", "datatrove_curate.py"}


def _rate(value: float) -> bool:
    return 0.0 <= value <= 1.0


def _check_align(r: dict) -> None:
    assert r["sft_instructions"] == 4 and r["ppo_prompts"] == 4 and r["ppo_steps"] == 2
    assert r["rm_pairs"] > 0 and r["sft_val_chats"] > 0
    rates = ["sft_eot_rate", "rm_accuracy", "length_baseline_accuracy", "ppo_win_rate"]
    assert all(_rate(r[k]) for k in rates + ["rm_from_pretrained_accuracy"])
    assert math.isfinite(r["sft_val_loss"]) and math.isfinite(r["ppo_kl"])


def _check_align_rl(r: dict) -> None:
    assert r["ppo_prompts"] == 4 and r["ppo_steps"] == 2
    assert _rate(r["ppo_win_rate"]) and r["ppo_rollout_tokens_per_s"] > 0


def _check_compiled_kernels(r: dict) -> None:
    kernels = {"split_qkv_rope", "swiglu", "rms_norm", "cross_entropy"}
    assert r["preset"] == "quick" and set(r["custom_op_faster_under_compile"]) == kernels
    variants = {"eager", "compiled, all custom ops", "compiled, all plain ops"}
    assert set(r["ms_per_step"]) == variants | {f"compiled, {k} plain" for k in kernels}
    assert all(ms > 0 for ms in r["ms_per_step"].values())


def _check_curate(r: dict) -> None:
    assert r["docs_in"] > 1000  # all of data/web, on each executor
    assert r["kept"]["scratchlm"] > 0 and r["kept"]["datatrove"] > 0
    # Same steps and thresholds: the two sides decide alike on nearly every document.
    assert r["kept_agreement_vs_datatrove"] >= 0.9
    assert set(r["step_docs_per_cpu_s"]) >= {"read", "langid", "gopher_quality"}


def _check_datatrove_curate(r: dict) -> None:
    assert r["docs"] == 200 and r["workers"] == 2
    assert 0 < r["kept"] < 200 and r["removed"]["langid"] > 0


def _check_dedup(r: dict) -> None:
    assert r["docs"] == 150 and r["positives"] > 0
    assert r["recall"] >= 0.9 and r["precision"] >= 0.9  # with verification: the figure's claim
    assert r["speedup_vs_datasketch"] > 0


def _check_eval(r: dict) -> None:
    assert [t["task"] for t in r["tasks"]] == [
        "copa", "hellaswag", "lambada", "perplexity", "gsm8k", "blimp",
    ]  # fmt: skip
    assert r["limit"] == 2
    # The harness running the same checkpoint scores every example as the in-house task does.
    assert r["max_abs_diff_points"] == 0.0 and r["max_abs_diff_points_hf"] == 0.0


def _check_faults(r: dict) -> None:
    assert r["failed"] == 0
    assert all(row["recovered"] == row["trials"] >= 1 for row in r["faults"].values())
    kinds = {"SIGKILL, pretrain", "disk full, pretrain", "SIGKILL, curate", "disk full, tokenize"}
    assert kinds <= set(r["faults"])


def _check_gpu(r: dict) -> None:
    rows = {row["model"]: row for row in r["results"]}
    assert set(rows) == {"scratchlm", "transformers"}
    assert all(row["tokens_per_s"] > 0 and row["peak_memory_gib"] > 0 for row in rows.values())
    assert rows["scratchlm"]["params"] == rows["transformers"]["params"]
    assert r["ratios"]["tiny"] > 0


def _check_memory(r: dict) -> None:
    rows = {row["model"]: row for row in r["results"]}
    assert set(rows) == {"scratchlm", "transformers"}
    assert all("error" not in row and row["peak_rss_mib"] > 100 for row in rows.values())


def _check_quality_per_time(r: dict) -> None:
    assert r["budget_seconds"] == 6.0
    assert all(0 < r[side]["val_bpb"] < 10 for side in ("anchor", "muon", "adamw"))
    assert r["muon"]["steps"] >= 1 and r["adamw"]["steps"] >= 1  # each trains for 1 s at least


def _check_scale(r: dict) -> None:
    layouts = {row["layout"]: row for row in r["results"]}
    assert set(layouts) == {"1 process", "DDP 2", "FSDP2 2", "TP 2", "PP 2 (1F1B)"}
    assert all("error" not in row and row["tokens_per_s_per_rank"] > 0 for row in layouts.values())


def _check_serve(r: dict) -> None:
    assert set(r["decode"]) == {"1M", "5M"}
    assert all(d["same_tokens"] for d in r["decode"].values())  # the same greedy tokens
    assert set(r["serve"]) == {"1", "8", "32"}
    # llama.cpp's side runs where llama-cpp-python is installed (make test-slow installs it).
    with_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    assert set(r["llama_cpp_tok_s"]) == ({"f16", "q8_0"} if with_llama_cpp else set())


def _check_sweep(r: dict) -> None:
    names = {row["candidate"] for row in r["results"]}
    assert names == {"reference", "pretrain.muon_lr=0.01", "model.n_layers=2"}
    assert all(0 < row["val_bpb"] < 10 for row in r["results"])


def _check_tokenizer(r: dict) -> None:
    assert [row["task"] for row in r["rows"]] == [
        "train BPE", "encode_batch", "write shards", "write shards",
    ]  # fmt: skip
    assert r["vocab_size"] == 4096 and r["tokens"] > 0


def _check_train_throughput(r: dict) -> None:
    assert r["preset"] == "quick" and r["steps"] == 2
    assert set(r["models"]) == {"scratchlm", "transformers"}
    assert r["models"]["scratchlm"]["params"] == r["models"]["transformers"]["params"]


CHECKS: dict[str, Callable[[dict], None]] = {
    name: globals()[f"_check_{name.removesuffix('.py')}"] for name in KEYS
}


@pytest.fixture(scope="session")
def datatrove_python(tmp_path_factory) -> str:
    """A Python with bench/requirements-datatrove.txt installed over this environment: a venv
    whose .pth file adds this environment's site-packages (their own .pth files included)."""
    venv = tmp_path_factory.mktemp("datatrove-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    venv_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lines = [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()]
    (Path(venv_site) / "project-environment.pth").write_text("\n".join(lines) + "\n")
    pip = subprocess.run(
        [python, "-m", "pip", "install", "-q", "-r", str(BENCH / "requirements-datatrove.txt")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    return str(python)


def bench_env() -> dict[str, str]:
    """This environment, with bench/ kept off PYTHONPATH: the scripts run as a user runs them."""
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    kept = [p for p in paths if p and Path(p).resolve() != BENCH]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(kept)}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_runs_quick(script: str, request) -> None:
    assert script in KEYS, (
        f"bench/{script} is new: give it --quick (the same path at the smallest sizes) and list "
        "its JSON keys and checks here"
    )
    python = request.getfixturevalue("datatrove_python") if script in NEEDS_DATATROVE else None
    proc = subprocess.run(
        [python or sys.executable, f"bench/{script}", "--quick", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=bench_env(),
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS[script] <= set(result), f"missing: {sorted(KEYS[script] - set(result))}"
    CHECKS[script](result)


def module_names(folder: Path) -> dict[str, Path]:
    """The top-level names a folder's modules and packages import as, when it leads sys.path."""
    found = {p.stem: p for p in folder.glob("*.py")}
    found |= {p.name: p for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"}
    return found


def shadowed(names: dict[str, Path]) -> dict[str, Path]:
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    return {name: path for name, path in names.items() if name in installed}


def test_no_bench_or_test_module_shadows_an_installed_package() -> None:
    names = module_names(BENCH) | module_names(TESTS)
    assert not shadowed(names), "rename these: they hide the installed package of that name"


def test_shadowing_check_catches_the_old_kernels_script(tmp_path: Path) -> None:
    """bench/kernels.py (now compiled_kernels.py) hid transformers' dependency `kernels`; a folder
    named like a standard module hides it too."""
    assert importlib.util.find_spec("kernels") is not None  # transformers imports it
    for name in ("kernels.py", "throughput.py", "json/__init__.py", "__pycache__/x.pyc"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    assert set(module_names(tmp_path)) == {"kernels", "throughput", "json"}
    assert set(shadowed(module_names(tmp_path))) == {"kernels", "json"}
