"""One "node" of a two-node job on this machine: run it twice, with NODE_RANK=0 and NODE_RANK=1.

    NODE_RANK=k MASTER_ADDR=127.0.0.1 MASTER_PORT=... python tests/two_node_job.py OUT_DIR

Lightning's subprocess launcher starts the node's second worker itself (``devices=2``), exactly as on a real
cluster; each of the 4 workers saves its groups and communication counters to OUT_DIR.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch

from lsgd_lightning import LSGDStrategy
from tests import models

GLOBAL_ROUNDS, TAU, LOCAL_TAU = 3, 4, 2
# The collective timeout, which is also how long the four processes (two launches, each starting a child that
# re-runs this script) wait for each other at the rendezvous; start-ups differ by tens of seconds under load.
TIMEOUT = timedelta(seconds=120)


def main(out: Path) -> None:
    pl.seed_everything(0, verbose=False)
    strategy = LSGDStrategy(tau=TAU, local_tau=LOCAL_TAU, group_size="node", final_sync=False, timeout=TIMEOUT)
    trainer = pl.Trainer(
        accelerator="cpu",
        num_nodes=2,
        devices=2,
        strategy=strategy,
        max_steps=GLOBAL_ROUNDS * TAU,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(models.Regressor(), models.train_loader(4))
    torch.save(
        {
            "rank": trainer.global_rank,
            "node": int(os.environ["NODE_RANK"]),
            "groups": strategy.groups,
            "comm": strategy.comm.state_dict(),
            "last_round": strategy.round_metrics,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
