"""Curation on a Ray cluster of two nodes (both on this machine): tasks run on both, and the
result is the local executor's."""

import pytest

ray = pytest.importorskip(
    "ray", reason="the ray extra is not installed: pip install 'scratchlm[ray]'"
)

from test_curate_ray import SETTINGS, WEB, everything  # noqa: E402

from scratchlm.curate.config import CurateConfig  # noqa: E402
from scratchlm.curate.pipeline import run_curate  # noqa: E402


@pytest.mark.slow
def test_two_node_cluster_runs_tasks_on_both_nodes(tmp_path):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = CurateConfig(executor="ray", workers=2, **SETTINGS)
        stats = run_curate([str(WEB)], tmp_path / "ray", cfg, progress=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    execution = stats["execution"]
    assert execution["nodes"] == 2
    assert all(n >= 5 for n in execution["tasks_per_node"].values()), execution
    cfg = CurateConfig(executor="local", workers=2, **SETTINGS)
    run_curate([str(WEB)], tmp_path / "local", cfg, progress=False)
    assert everything(tmp_path / "ray") == everything(tmp_path / "local")
