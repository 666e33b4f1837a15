"""Lightning-free building blocks of the strategies: they import torch only (a test keeps it so).

============================  ======================================================================================
``rules``                     every update rule as a pure function of tensors (the math of each paper)
``flat``                      a model's parameters and buffers as a few flat buffers (one collective per bucket)
``scores``                    a worker's window of recent training losses: its score and the divergence test
``collectives``               accounted collectives (``comm/bytes``, ``comm/seconds``) and the chain broadcast
``transfer``                  a leader's weights in flight while training goes on (asynchronous collectives)
``gossip``                    mixing matrices of the decentralized strategies and the point-to-point exchange
``signs``                     signs packed one bit per coordinate, and the majority vote over packed signs
``board``                     shared state on the job's c10d store, for the asynchronous strategies
``health``                    failures, heartbeats and stop requests on the job's store; naming the failed worker
``guard``                     collectives that first wait for live workers (asynchronous strategies)
``watchdog``                  naming a dead or hung peer on NCCL within the strategy's timeout
============================  ======================================================================================
"""
