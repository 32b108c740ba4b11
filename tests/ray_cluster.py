"""A two-node Ray cluster on 127.0.0.1 for the tests, in a process of its own (``python -m
tests.ray_cluster``): a head and a second node, each with one CPU and a small object store,
every process bound to the loopback address, every file under ``RAY_TMPDIR``. Prints one JSON line (the GCS address and the
pids of the second node's processes) once both nodes are up, then holds the cluster until its
standard input closes, and shuts it down.

Ray turns 127.0.0.1 into the machine's interface address for multi-node clusters unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its single-machine mode), which its CLI then refuses
for a second node: ``ray.cluster_utils.Cluster`` starts the nodes without the CLI.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from ray.cluster_utils import Cluster

OBJECT_STORE_BYTES = 80 * 1024 * 1024


def main() -> None:
    temp_dir = os.path.join(os.environ["RAY_TMPDIR"], "ray")  # where Ray also notes the address
    os.makedirs(temp_dir, exist_ok=True)
    node_args = {
        "num_cpus": 1,
        "object_store_memory": OBJECT_STORE_BYTES,
        "node_ip_address": "127.0.0.1",
        "include_dashboard": False,
        "temp_dir": temp_dir,
    }
    cluster = Cluster(initialize_head=True, head_node_args=node_args)
    second = cluster.add_node(**{k: v for k, v in node_args.items() if k != "include_dashboard"})  # type: ignore[arg-type]
    cluster.wait_for_nodes()
    pids = [p.process.pid for procs in second.all_processes.values() for p in procs]
    print(json.dumps({"address": cluster.address, "second_node_pids": pids}), flush=True)
    try:
        sys.stdin.read()  # held until the test closes our stdin (or is gone)
    finally:
        cluster.shutdown()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
