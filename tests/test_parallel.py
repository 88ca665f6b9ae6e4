"""Data, tensor and pipeline parallelism under torchrun on CPU (gloo, 2 processes, fp32).

Each layout trains five steps of the tiny recipe and must give the single-process losses; sharded
checkpoints resume at another world size; SIGTERM on every rank saves and exits.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file
from test_pretrain import TINY, _fresh_copy, _losses, make_corpus_run

from scratchlm import load
from scratchlm.checkpoint import is_sharded, list_checkpoints, resolve_checkpoint
from scratchlm.config import load_recipe
from scratchlm.export.hf import export_run
from scratchlm.parallel.pipeline import stage_layers
from scratchlm.train.metrics import read_metrics
from scratchlm.train.pretrain import pretrain

FIVE_STEPS = [*TINY, "pretrain.max_steps=5"]
KV2 = ["model.n_kv_heads=2"]  # tensor parallelism splits whole kv-head groups over 2 ranks
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _set_args(overrides):
    return [f"--set={s}" for s in overrides]


def torchrun(run_dir, overrides, *flags, nproc=2, torchrun_args=(), **popen):
    """`torchrun --nproc_per_node=N -m scratchlm pretrain` on a run folder."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        *torchrun_args,
        "-m",
        "scratchlm",
        "pretrain",
        "--run-dir",
        str(run_dir),
        *flags,
        *_set_args(overrides),
    ]
    if popen:
        return subprocess.Popen(cmd, env=ENV, text=True, **popen)
    return subprocess.run(cmd, env=ENV, text=True, capture_output=True, timeout=300)


def _assert_ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]


def _assert_same_losses(run, reference, steps=range(1, 6)):
    got, want = _losses(run), _losses(reference)
    assert sorted(got) == list(steps)
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-4), f"step {step}"


def _resume_on_one_process(step3, corpus, run, overrides, reference):
    """Resume a copy of the corpus from the checkpoint `step3` in this process; steps 4 and 5
    must give the uninterrupted run's losses."""
    _fresh_copy(corpus, run)
    (run / "pretrain").mkdir()
    os.symlink(step3, run / "pretrain" / "step-000003")
    (run / "pretrain" / "latest").symlink_to("step-000003")
    pretrain(load_recipe(None, overrides), run, resume=True, progress=False)
    _assert_same_losses(run, reference, steps=[4, 5])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("corpus")
    make_corpus_run(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """The single-process references: the tiny recipe, and with two kv heads."""
    runs = {}
    for name, extra in [("base", []), ("kv2", KV2)]:
        run = _fresh_copy(corpus, tmp_path_factory.mktemp("single") / name)
        pretrain(load_recipe(None, [*FIVE_STEPS, *extra]), run, progress=False)
        runs[name] = run
    return runs


def test_stage_layers_split_evenly():
    assert stage_layers(4, 2) == [[0, 1], [2, 3]]
    assert stage_layers(5, 3) == [[0, 1], [2, 3], [4]]
    with pytest.raises(Exception, match="n_layers=2 is fewer than parallel.pp=3"):
        stage_layers(2, 3)


def test_wrong_layout_is_one_line(corpus, tmp_path):
    run = _fresh_copy(corpus, tmp_path / "run")
    # torchrun describes the world in the environment; the layout is checked before joining it.
    proc = run_cli(
        "pretrain",
        "--run-dir",
        str(run),
        *_set_args([*FIVE_STEPS, "parallel.tp=3"]),
        env={**ENV, "WORLD_SIZE": "2", "RANK": "0"},
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: parallel.dp_replicate=1 x parallel.dp_shard=1 x parallel.tp=3 x parallel.pp=1 "
        "= 3, but the world size is 2"
    ]


def test_deepspeed_without_a_launcher_is_one_line(corpus, tmp_path):
    run = _fresh_copy(corpus, tmp_path / "run")
    proc = run_cli(
        "pretrain",
        "--run-dir",
        str(run),
        *_set_args([*FIVE_STEPS, "parallel.engine=deepspeed"]),
        env=ENV,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: parallel.engine='deepspeed' needs a launcher: "
        "torchrun --nproc_per_node=N -m scratchlm pretrain ..."
    ]


@pytest.mark.parametrize(
    "layout",
    [
        # The demo's micro-batch holds the whole global batch: each rank's share is half of it.
        ["parallel.dp_replicate=2", "pretrain.micro_batch_size=8"],
        ["parallel.tp=2", *KV2, "parallel.activation_checkpointing=true"],
        ["parallel.pp=2", "parallel.pp_schedule=gpipe"],
        ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
    ],
    ids=["ddp", "tp", "pp-gpipe", "pp-1f1b"],
)
def test_two_ranks_match_one_process(layout, corpus, single, tmp_path):
    run = _fresh_copy(corpus, tmp_path / "run")
    proc = torchrun(run, [*FIVE_STEPS, *layout])
    _assert_ok(proc)
    if "pretrain.micro_batch_size=8" in layout:
        note = "note: pretrain.micro_batch_size=8 does not divide this rank's 4 sequences per step"
        assert f"{note}; using 4" in proc.stdout
    extra = KV2 if "model.n_kv_heads=2" in layout else []
    reference = single["kv2"] if extra else single["base"]
    _assert_same_losses(run, reference)
    final = read_metrics(run / "metrics.jsonl")[-1]
    want = read_metrics(reference / "metrics.jsonl")[-1]
    assert final["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4)
    step3 = run / "pretrain" / "step-000003"
    # DDP replicates whole weights; tensor and pipeline parallel ranks each save their part.
    assert is_sharded(step3) == ("parallel.dp_replicate=2" not in layout)
    _resume_on_one_process(step3, corpus, tmp_path / "one", [*FIVE_STEPS, *extra], reference)


def test_fsdp2_matches_and_its_checkpoint_resumes_on_one_process(corpus, single, tmp_path):
    sharded = _fresh_copy(corpus, tmp_path / "fsdp")
    layout = ["parallel.dp_shard=2", "parallel.activation_checkpointing=true"]
    _assert_ok(torchrun(sharded, [*FIVE_STEPS, *layout]))
    _assert_same_losses(sharded, single["base"])
    step3 = sharded / "pretrain" / "step-000003"
    assert is_sharded(step3) and not (step3 / "model.safetensors").exists()
    assert resolve_checkpoint(step3) == step3  # the manifest covers every rank's shard

    # 2 ranks -> 1: resume from step 3 without a process group.
    _resume_on_one_process(step3, corpus, tmp_path / "one", FIVE_STEPS, single["base"])
    # The same from the command line, whose recipe.toml still says dp_shard=2: the saved layout
    # fills the one process, with a note, and the run continues.
    resumed = tmp_path / "resumed"
    shutil.copytree(sharded, resumed, symlinks=True)
    proc = run_cli("pretrain", "--run-dir", str(resumed), "--resume", "--set=pretrain.max_steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parallel.dp_shard=2 does not fit the world size 1; using dp_shard=1" in proc.stdout
    assert max(_losses(resumed)) == 6

    # The sharded final checkpoint consolidates into the same weights as the one-process run.
    sharded_model, _ = load(sharded)
    single_model, _ = load(single["base"])
    for (name, a), (_, b) in zip(
        sharded_model.state_dict().items(), single_model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    # ... and so exports to the same single-file Hugging Face model.
    exported = load_file(export_run(sharded, tmp_path / "hf-sharded") / "model.safetensors")
    reference = load_file(export_run(single["base"], tmp_path / "hf") / "model.safetensors")
    assert exported.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_single_file_checkpoint_resumes_on_two_fsdp2_ranks(corpus, single, tmp_path):
    run = _fresh_copy(corpus, tmp_path / "run")
    (run / "pretrain").mkdir()
    step3 = single["base"] / "pretrain" / "step-000003"
    os.symlink(step3, run / "pretrain" / "step-000003")
    (run / "pretrain" / "latest").symlink_to("step-000003")
    _assert_ok(torchrun(run, [*FIVE_STEPS, "parallel.dp_shard=2"], "--resume"))
    _assert_same_losses(run, single["base"], steps=[4, 5])
    assert is_sharded(run / "pretrain" / "latest")


def test_sigterm_on_every_rank_saves_a_sharded_checkpoint(corpus, tmp_path):
    run = _fresh_copy(corpus, tmp_path / "run")
    overrides = [
        *TINY,
        "pretrain.max_steps=100000",
        "pretrain.save_every=0",
        "pretrain.eval_every=0",
        "parallel.dp_shard=2",
    ]
    # A scheduler's preemption signals every process of the job: torchrun and both ranks.
    proc = torchrun(
        run, overrides, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(run / "metrics.jsonl")) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert out.count("continue with --resume") == 2, out[-3000:]
    (latest,) = list_checkpoints(run / "pretrain")
    assert resolve_checkpoint(latest) == latest and is_sharded(latest)
    assert int(latest.name.removeprefix("step-")) == max(_losses(run))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_with_a_local_rendezvous(corpus, single, tmp_path):
    run = _fresh_copy(corpus, tmp_path / "run")
    rendezvous = [
        "--nnodes=2",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{_free_port()}",
        "--rdzv_id=two-nodes",
    ]
    nodes = [
        torchrun(
            run,
            [*FIVE_STEPS, "parallel.dp_shard=2"],
            nproc=1,
            torchrun_args=rendezvous,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    for node in nodes:
        out, _ = node.communicate(timeout=300)
        assert node.returncode == 0, out[-3000:]
    _assert_same_losses(run, single["base"])


@pytest.mark.slow  # DeepSpeed compiles its C++ communication op on first use (about a minute)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_one_process(stage, corpus, single, tmp_path):
    pytest.importorskip("deepspeed")
    run = _fresh_copy(corpus, tmp_path / "run")
    layout = ["parallel.engine=deepspeed", f"parallel.zero_stage={stage}", "parallel.dp_shard=2"]
    _assert_ok(torchrun(run, [*FIVE_STEPS, *layout]))
    _assert_same_losses(run, single["base"])
    # The checkpoint holds the weights gathered from the ZeRO partitions, in the single-file format.
    ds_model, _ = load(run)
    single_model, _ = load(single["base"])
    for (name, a), (_, b) in zip(
        ds_model.state_dict().items(), single_model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow  # four processes on a 2-core machine
@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.dp_replicate=2", "parallel.dp_shard=2"],
        ["parallel.dp_shard=2", "parallel.tp=2"],
        ["parallel.dp_shard=2", "parallel.pp=2"],
        ["parallel.tp=2", "parallel.pp=2"],
    ],
    ids=["hsdp", "fsdp-tp", "fsdp-pp", "tp-pp"],
)
def test_four_ranks_in_two_dimensions_match_one_process(layout, corpus, single, tmp_path):
    run = _fresh_copy(corpus, tmp_path / "run")
    overrides = [*FIVE_STEPS, *KV2, "pretrain.micro_batch_size=2", *layout]
    _assert_ok(torchrun(run, overrides, nproc=4))
    _assert_same_losses(run, single["kv2"])
