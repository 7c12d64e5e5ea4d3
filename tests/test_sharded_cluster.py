"""A sharded ledger on a two-node Ray cluster on loopback (`ray.cluster_utils.Cluster`): each
shard pinned to its node, cross-shard transfers between the nodes, and a shard's actor killed
and restarted on its own node, where its ledger is."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import ShardedLedger
from tests.sharded_support import SHARDS, accounts_on, books, poll, shard_dirs
from tests.test_cli import tally_json

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    import ray
    from ray.cluster_utils import Cluster

    from engine._ray import LOOPBACK_ENVIRONMENT, _loopback_in_this_process

    if ray.is_initialized():
        ray.shutdown()
    os.environ.update(LOOPBACK_ENVIRONMENT)
    _loopback_in_this_process()
    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    made.add_node(num_cpus=1)
    made.wait_for_nodes()
    try:
        yield made
    finally:
        if ray.is_initialized():
            ray.shutdown()
        made.shutdown()


def test_shards_on_two_nodes_transfer_across_them_and_a_killed_shard_restarts_on_its_node(
        cluster: Any, tmp_path: Path) -> None:
    import ray

    nodes = [cluster.head_node.node_id, *(node.node_id for node in cluster.worker_nodes)]
    assert len(set(nodes)) == SHARDS
    path = tmp_path / "books"
    with ShardedLedger.open(path, shards=SHARDS, address=cluster.address, nodes=nodes) as ledger:
        assert ledger.nodes() == nodes
        left = accounts_on(ledger, "l", 2, shard=0, balance=100)
        right = accounts_on(ledger, "r", 2, shard=1, balance=100)
        for i in range(10):
            ledger.transfer(f"x{i}", source=(left + right)[i % 4], destination=(right + left)[i % 4], amount=3)
        victim = ledger.pids()[1]
        ray.kill(ledger._router.actors[1], no_restart=False)
        poll(lambda: ledger.pids()[1] != victim, 60, "the shard to restart")
        assert ledger.nodes() == nodes
        ledger.transfer("after", source=right[0], destination=left[0], amount=1)
        sums, pairs, in_flight, _ = books(ledger)
        assert sums == [0, 0] and set(pairs.values()) == {0} and in_flight == 0
        assert sum(ledger.balance(name).posted for name in left + right) == 400
    for directory in shard_dirs(path):
        assert tally_json("verify", directory)[1]["verdict"] == "whole"
