"""Executors: run a list of independent tasks, locally in processes or as Ray tasks.

A task is a module-level function and one picklable argument; it reads its inputs from and writes
its outputs to storage, and returns a small result (counts, timings). The pipeline is a sequence
of `map` calls, so the same steps run unchanged on one machine or on a Ray cluster, and their
outputs are the same.

One progress bar follows every task of a run: each stage adds its tasks to the bar's total.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from scratchlm.errors import RunFault, UserError

EXECUTORS = ("local", "ray")
RAY_MAX_RETRIES = 3
CANCEL_WAIT_S = 60
"""How long a failed map waits for the tasks it cancelled to end."""
"""Times Ray reruns a task whose worker process or node died; a task that raises is not rerun."""
FORWARDED_ENV_PREFIXES = ("FSSPEC_",)
"""Driver environment variables the Ray job's workers get too: fsspec's own settings (endpoints,
options), so that every node reaches the same storage. Credentials stay the nodes' business."""


class Progress:
    """One tqdm bar over all tasks of a run; a stage grows its total and names itself."""

    def __init__(self, enabled: bool, desc: str) -> None:
        from tqdm import tqdm

        self.prefix = desc
        self.bar = tqdm(total=0, desc=desc, unit="task", disable=not enabled)

    def add(self, n: int, stage: str) -> None:
        self.bar.total += n
        self.bar.set_description(f"{self.prefix}: {stage}")
        self.bar.refresh()

    def update(self) -> None:
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


class LocalExecutor:
    """Tasks in a pool of forked processes (in this process with one worker)."""

    kind = "local"

    def __init__(self, workers: int = 0) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.pool = None
        self.tasks = 0

    def map(self, fn: Callable[[Any], Any], jobs: list, progress: Progress, stage: str) -> list:
        progress.add(len(jobs), stage)
        self.tasks += len(jobs)
        if self.workers <= 1 or len(jobs) <= 1:
            results = []
            for job in jobs:
                results.append(fn(job))
                progress.update()
            return results
        if self.pool is None:
            # fork: the children inherit the loaded modules; a pool lives for the whole run so
            # that models are loaded once per process.
            ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            self.pool = ctx.Pool(self.workers)
        results: list = [None] * len(jobs)
        for i, result in self.pool.imap_unordered(
            _indexed, [(fn, i, j) for i, j in enumerate(jobs)]
        ):
            results[i] = result
            progress.update()
        return results

    def summary(self) -> dict:
        return {"executor": "local", "workers": self.workers, "tasks": self.tasks}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None


def _indexed(args: tuple) -> tuple[int, Any]:
    fn, i, job = args
    return i, fn(job)


def _on_ray(fn: Callable[[Any], Any], job: Any) -> tuple[Any, str]:
    import ray

    return fn(job), ray.get_runtime_context().get_node_id()


class RayExecutor:
    """Tasks on a Ray cluster, at most `workers` at a time (0: as many as the cluster has CPUs).

    address: "" starts a Ray instance on this machine for the run; "auto" joins the cluster this
    machine belongs to; "HOST:PORT" joins that one. When Ray is already initialised in this process
    (a notebook, a test), that instance is used and left running.
    """

    kind = "ray"

    def __init__(self, workers: int = 0, address: str = "") -> None:
        try:
            import ray
        except ImportError:
            raise UserError(
                "curate.executor = 'ray' needs Ray: pip install 'scratchlm[ray]'"
            ) from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": True,
                "runtime_env": {"env_vars": env} if env else None,
            }
            if address:
                kwargs["address"] = address
            elif workers:
                kwargs["num_cpus"] = workers
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise UserError(f"cannot reach the Ray cluster at {address!r}: {e}") from None
            self.started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = min(workers, cpus) if workers else cpus
        self.remote = ray.remote(num_cpus=1, max_retries=RAY_MAX_RETRIES)(_on_ray)
        self.tasks_per_node: Counter[str] = Counter()

    def map(self, fn: Callable[[Any], Any], jobs: list, progress: Progress, stage: str) -> list:
        ray = self.ray
        progress.add(len(jobs), stage)
        results: list = [None] * len(jobs)
        pending: dict = {}
        queue = list(enumerate(jobs))
        queue.reverse()
        while queue or pending:
            while queue and len(pending) < self.workers:
                i, job = queue.pop()
                pending[self.remote.remote(fn, job)] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    results[i], node = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    for other in pending:
                        ray.cancel(other)
                    # Cancelled tasks remove their partial files; none writes once this raises.
                    ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)
                    if isinstance(getattr(e, "cause", None), UserError):
                        raise UserError(str(e.cause)) from None
                    if isinstance(getattr(e, "cause", None), RunFault):  # a full disk, ...
                        raise RunFault(str(e.cause)) from None
                    raise
                self.tasks_per_node[node] += 1
                progress.update()
        return results

    def summary(self) -> dict:
        return {
            "executor": "ray",
            "workers": self.workers,
            "tasks": sum(self.tasks_per_node.values()),
            "nodes": len(self.tasks_per_node),
            "tasks_per_node": dict(sorted(self.tasks_per_node.items())),
        }

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(kind: str, workers: int = 0, address: str = ""):
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(workers, address)
    raise UserError(f"unknown executor {kind!r}; known: {', '.join(EXECUTORS)}")
