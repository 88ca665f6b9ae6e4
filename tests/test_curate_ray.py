"""The Ray executor: the same results as the local one, on a local Ray instance of 2 CPUs.

Every test here shares one Ray instance (and one local S3 endpoint, moto's server mode), started
once for the module; make test keeps the module on one xdist worker (xdist_group).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT

ray = pytest.importorskip(
    "ray", reason="the ray extra is not installed: pip install 'scratchlm[ray]'"
)
pytest.importorskip("s3fs", reason="the ray extra is not installed: pip install 'scratchlm[ray]'")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")

from scratchlm.curate import storage  # noqa: E402
from scratchlm.curate.config import CurateConfig  # noqa: E402
from scratchlm.curate.pipeline import read_docs, run_curate  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray")

WEB = ROOT / "data" / "web"
# Small enough that the WARC excerpt is read as several byte ranges and dedup has 4 partitions.
SETTINGS = {"shard_bytes": 40_000, "dedup_docs_per_task": 300}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config

    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
    yield endpoint
    fsspec.config.conf["s3"].pop("endpoint_url", None)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def ray_instance(s3_endpoint):
    """A local Ray instance of 2 CPUs; its workers inherit the S3 endpoint settings above."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def curate(inputs, out, executor, **settings):
    cfg = CurateConfig(executor=executor, workers=2, **{**SETTINGS, **settings})
    return run_curate([str(i) for i in inputs], out, cfg, progress=False)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    return out, curate([WEB], out, "local")


def everything(out) -> dict:
    """Every output and audit file of a run, decoded, and stats.json without its timings."""
    files = {}
    for path in storage.list_files(str(out)):
        rel = "/".join(storage.relative_parts(path, str(out)))
        if rel.endswith(".jsonl.zst") and not rel.startswith(".work"):
            files[rel] = list(read_docs(path))
    import json

    stats = json.loads(storage.read_bytes(storage.join(str(out), "stats.json")))
    for step in stats["steps"]:
        step["seconds"] = 0
    del stats["wall_seconds"], stats["execution"]
    return {"files": files, "stats": stats}


def ray_task_processes() -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::_on_ray"):  # a worker while it runs one of our tasks
            found.append(proc)
    return found


def test_ray_keeps_the_same_documents_as_local_with_a_worker_killed(
    ray_instance, local_run, tmp_path
):
    """The bundled web sample on Ray: the same kept documents, duplicate_of, audit files and
    stats.json counts as the local executor, although a worker is killed in the middle of a
    task (Ray runs the task again)."""
    killed = []
    stop = threading.Event()

    def kill_one():
        while not stop.is_set() and not killed:
            for proc in ray_task_processes():
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.pid)
                break
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one)
    killer.start()
    try:
        stats = curate([WEB], tmp_path / "out", "ray")
    finally:
        stop.set()
        killer.join()
    assert killed, "no task was running to be killed"
    assert stats["execution"]["executor"] == "ray" and stats["execution"]["tasks"] > 20
    assert stats["shards"] > 8  # the WARC excerpt was split into byte ranges
    got, expected = everything(tmp_path / "out"), everything(local_run[0])
    assert got == expected
    near = [
        d for k, v in expected["files"].items() if k.startswith("rejected/near_dedup") for d in v
    ]
    assert len(near) > 10 and all("duplicate_of" in d for d in near)
    assert local_run[1]["output"]["docs"] == 343


def test_s3_to_s3_matches_local(ray_instance, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("corpus-bucket")
    names = ["commoncrawl_CC-MAIN-2020-34_excerpt.warc.gz", "c4_demo.jsonl.gz"]
    local_in = tmp_path / "in"
    local_in.mkdir()
    for name in names:
        shutil.copy(WEB / name, local_in / name)
        fs.put(str(WEB / name), f"corpus-bucket/in/{name}")
    stats = curate(["s3://corpus-bucket/in"], "s3://corpus-bucket/out", "ray")
    expected = curate([local_in], tmp_path / "out", "local")
    assert fs.exists("corpus-bucket/out/stats.json")
    assert stats["steps"] == [
        {**s, "seconds": stats["steps"][i]["seconds"]} for i, s in enumerate(expected["steps"])
    ]

    def texts(out):
        return sorted(
            d["text"] for p in storage.glob(f"{out}/part-*.jsonl.zst") for d in read_docs(p)
        )

    assert texts("s3://corpus-bucket/out") == texts(str(tmp_path / "out"))
    assert stats["output"]["docs"] > 100


def test_restarted_driver_redoes_only_unfinished_shards(ray_instance, local_run, tmp_path):
    out = tmp_path / "out"
    p1 = out / ".work" / "p1"
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scratchlm",
            "curate",
            str(WEB),
            "--out",
            str(out),
            "--executor",
            "ray",
            "--ray-address",
            ray_instance,
            "--set",
            f"curate.shard_bytes={SETTINGS['shard_bytes']}",
            "--set",
            f"curate.dedup_docs_per_task={SETTINGS['dedup_docs_per_task']}",
            "--set",
            "curate.workers=2",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(p1.glob("*.stats.json"))) < 2:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in p1.glob("*.stats.json")}
    assert 2 <= len(finished) < 9, "the driver was not stopped in the first pass"
    curate([WEB], out, "ray")
    assert {p: (p1 / p).stat().st_mtime_ns for p in finished} == finished
    assert everything(out) == everything(local_run[0])


def test_bad_documents_are_set_aside_not_fatal_on_ray(ray_instance, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "ok text"}\n{broken\n{"body": 1}\n')
    (tmp_path / "in" / "b.txt").write_bytes(bytes(range(256)) * 40)
    stats = curate([tmp_path / "in"], tmp_path / "out", "ray", shard_bytes=10)
    assert stats["shards"] == 5  # a.jsonl in 4 byte ranges, b.txt whole
    assert stats["bad_input"]["reasons"] == {
        "binary file": 1,
        "invalid json": 1,
        "missing text field 'text'": 1,
    }
    audit = [
        d for p in (tmp_path / "out" / "rejected" / "read").glob("*.zst") for d in read_docs(str(p))
    ]
    assert sorted(d["reason"] for d in audit) == [
        "binary file",
        "invalid json",
        "missing text field 'text'",
    ]


def test_tokenize_on_ray_writes_the_same_shards(ray_instance, local_run, tmp_path):
    from scratchlm.documents import document_files
    from scratchlm.shards import write_token_shards
    from scratchlm.tokenizer import train_tokenizer

    docs = document_files(local_run[0])
    train_tokenizer(
        (d["text"] for f in docs for d in read_docs(str(f))), 400, tmp_path / "tok.json"
    )
    outs = {}
    for executor in ("local", "ray"):
        outs[executor] = tmp_path / executor
        write_token_shards(
            docs,
            tmp_path / "tok.json",
            outs[executor],
            0.1,
            seed=1,
            workers=2,
            shard_tokens=20_000,
            executor=executor,
        )
    names = sorted(p.name for p in outs["local"].iterdir())
    assert len(names) > 4 and names == sorted(p.name for p in outs["ray"].iterdir())
    for name in names:
        assert (outs["local"] / name).read_bytes() == (outs["ray"] / name).read_bytes(), name


def test_cli_curate_and_tokenize_take_the_executor(ray_instance, tmp_path, cli):
    data = tmp_path / "a.jsonl"
    data.write_text("".join(f'{{"text": "{GOOD}"}}\n'.replace("NUM", str(i)) for i in range(3)))
    result = cli(
        "curate",
        str(data),
        "--out",
        str(tmp_path / "o"),
        "--only",
        "normalize,pii",
        "--executor",
        "ray",
        "--ray-address",
        ray_instance,
    )
    assert result.returncode == 0, result.stderr
    import json

    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["execution"]["executor"] == "ray" and stats["output"]["docs"] == 3
    bad = cli("curate", str(data), "--out", str(tmp_path / "o2"), "--executor", "spark")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr

    from scratchlm.tokenizer import train_tokenizer

    run = tmp_path / "run"
    shutil.copytree(tmp_path / "o", run / "curated")
    texts = [d["text"] for p in (run / "curated").glob("part-*.zst") for d in read_docs(str(p))]
    train_tokenizer(texts * 20, 300, run / "tokenizer.json", min_frequency=1)
    metas = []
    for executor in ("local", "ray"):
        result = cli(
            "tokenize",
            "--run-dir",
            str(run),
            "--executor",
            executor,
            "--ray-address",
            ray_instance,
            "--set",
            "tokens.val_fraction=0.4",
        )
        assert result.returncode == 0, result.stderr
        metas.append((run / "tokens" / "meta.json").read_bytes())
        assert (run / "tokens" / "val-00000.bin").is_file()
    assert metas[0] == metas[1]


GOOD = (
    "Story NUM. The river runs through the old town and past the mill. People walk along the "
    "bank in the evening to watch the boats. The bakery near the bridge sells bread that is still "
    "warm. Children play in the park while their parents talk with the neighbours. In the summer "
    "there is a market with fruit and flowers from the farms in the valley. Many visitors come to "
    "see the church, which is more than five hundred years old and has a tall tower with a clock."
)


def test_user_error_in_a_task_is_one_line_on_ray(ray_instance, tmp_path):
    from scratchlm.errors import UserError

    (tmp_path / "a.txt").write_text("one\ntwo\n")
    with pytest.raises(UserError, match=r"curate.text_separator '\(': "):
        curate([tmp_path / "a.txt"], tmp_path / "out", "ray", text_separator="(")


def test_a_full_disk_in_a_ray_task_is_one_line(ray_instance, tmp_path):
    """A real full disk (a 64 KiB tmpfs as OUT; mounting needs root) met by a Ray task."""
    from tmpfs_trials import Unavailable, tmpfs

    from scratchlm.errors import RunFault

    try:
        with tmpfs(tmp_path / "small", 64 * 1024):
            with pytest.raises(RunFault, match=r"^disk full writing .* to .*: needs more than "):
                curate([WEB], tmp_path / "small" / "out", "ray")
            assert not list((tmp_path / "small").rglob("*.tmp"))
    except Unavailable as e:
        print(f"skipped: {e}")
        pytest.skip(str(e))


def test_small_files_grouped_into_tasks_on_ray_match_local(ray_instance, tmp_path):
    """300 small files are 4 groups (shard_bytes 40,000): 4 tasks per pass on Ray, with the
    output of the local executor; a restarted run keeps the groups it had finished."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(300):
        (folder / f"{i:03d}.txt").write_text(GOOD.replace("NUM", f"{i} " * (i % 7)))
    stats = curate([folder], tmp_path / "ray", "ray")
    assert stats["shards"] == 4 and stats["output"]["files"] == 4
    curate([folder], tmp_path / "local", "local")
    assert everything(tmp_path / "ray") == everything(tmp_path / "local")
    p1 = tmp_path / "ray" / ".work" / "p1"
    (p1 / "part-00002.stats.json").unlink()
    kept = (p1 / "part-00001.jsonl.zst").stat().st_mtime_ns
    curate([folder], tmp_path / "ray", "ray")
    assert (p1 / "part-00001.jsonl.zst").stat().st_mtime_ns == kept
    assert everything(tmp_path / "ray") == everything(tmp_path / "local")
