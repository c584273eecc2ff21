"""kernels/tile_configs.py: every tuned tile is a valid config."""

from __future__ import annotations

import torch

from fusionserve.kernels import tile_configs
from tests.kernels.common import DEVICE, DTYPES, M_VALUES, TOL, check, poison_outputs, rand  # noqa: F401

N, K = 37, 45  # odd: no multiple of any block size
EPS = 1e-5


def test_config_tables_are_valid():
    for (n, k, bm, _), cfg in tile_configs.TUNED.items():
        assert cfg[0] == bm and cfg[1] in (16, 32, 64, 128) and cfg[2] >= 32 and len(cfg) == 6, (n, k, cfg)
    assert TOL[torch.float32] == 1e-4
