"""A real two-node job on one machine: two launches with NODE_RANK 0 and 1, 2 workers each, group_size="node"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests import simulation as sim
from tests.conftest import script_env
from tests.multiproc import free_port
from tests.two_node_job import GLOBAL_ROUNDS, LOCAL_TAU, TAU

ROOT = Path(__file__).resolve().parents[1]


def test_groups_follow_nodes_and_inter_node_traffic_is_one_copy_per_other_group(tmp_path: Path) -> None:
    port = str(free_port())
    nodes = []
    for node_rank in (0, 1):
        env = script_env(NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        nodes.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "two_node_job.py"), str(tmp_path)],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=400)[0])  # a hang guard (the rendezvous alone may take 120 s)
    finally:
        for node in nodes:
            node.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    results = {r: torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(4)}
    for rank, result in results.items():
        assert result["groups"] == [[0, 1], [2, 3]]
        assert result["node"] == rank // 2  # each group is exactly the ranks of one node
        assert "lsgd/local_leader" in result["last_round"] and "lsgd/leader" in result["last_round"]

    model_bytes = sum(v.numel() * v.element_size() for v in sim.initial_net().state_dict().values())
    rounds = GLOBAL_ROUNDS * TAU // LOCAL_TAU
    score_bytes = rounds * 4 * 4  # the all-gather of 4 scores, every round, on every rank
    weights_inter = [results[r]["comm"]["bytes_inter"] - score_bytes for r in range(4)]
    # Per global round, the leader's column (one rank per node) carries the weights across nodes: 2 ranks hand
    # over one model copy each (the leader sends, the other node's rank receives), i.e. (groups - 1) = 1 copy
    # received across the node boundary. A flat broadcast would deliver (world size - 1) = 3.
    assert sum(weights_inter) == GLOBAL_ROUNDS * 2 * model_bytes
    copies_received_across_nodes = sum(weights_inter) / model_bytes - GLOBAL_ROUNDS  # minus what the leaders sent
    assert copies_received_across_nodes / GLOBAL_ROUNDS == 1
