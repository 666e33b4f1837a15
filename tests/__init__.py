"""The test suite. Importing it applies NCCL's rules to torch.distributed when LSGD_LIGHTNING_EMULATE_NCCL=1 (the
suite's default, set by ``tests/conftest.py``): every spawned worker and job script imports ``tests``."""

from tests.nccl_rules import install_if_enabled

install_if_enabled()
