"""kernels/tile_configs.py: every tuned tile is a valid config."""

from __future__ import annotations

import torch

from fusionserve.kernels import tile_configs
from tests.kernels.common import DEVICE, DTYPES, M_VALUES, TOL, check, poison_outputs, rand  # noqa: F401

N, K = 37, 45  # odd: no multiple of any block size
EPS = 1e-5


def test_config_tables_are_valid():
    for family, table in tile_configs.SHIPPED.items():
        for (n, k, bm, _), cfg in table.items():
            assert cfg[0] == bm and cfg[1] in (16, 32, 64, 128) and cfg[2] >= 32 and len(cfg) == 6, (
                family,
                n,
                k,
            )
    assert TOL[torch.float32] == 1e-4


def test_tile_tables_per_gpu_model(tmp_path, monkeypatch):
    """Each GPU family gets its shipped table, overlaid with a sweep cached for its exact model; an
    unknown GPU gets the rule alone; no CUDA device (tests, CPU): TUNED."""
    assert tile_configs.gpu_family("NVIDIA H200") == "H200"
    assert tile_configs.gpu_family("NVIDIA H100 80GB HBM3") == "H100"
    assert tile_configs.gpu_family("NVIDIA A100-SXM4-80GB") is None
    assert tile_configs.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tile_configs.tile_table_for("cpu", tmp_path) is tile_configs.TUNED
    pythia_up = (16384, 4096, 16, False)
    assert pythia_up in tile_configs.SHIPPED["H200"] and pythia_up not in tile_configs.SHIPPED["H100"]
    swept = {(576, 576, 16, False): (16, 32, 128, 4, 3, 2), (7, 9, 32, True): (32, 16, 64, 2, 2)}
    tile_configs.save_tiles(tmp_path / "nvidia-h200.json", swept)
    assert tile_configs.load_tiles(tmp_path / "nvidia-h200.json") == {
        key: tile_configs.norm_cfg(cfg) for key, cfg in swept.items()
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, family in (("NVIDIA H200", "H200"), ("NVIDIA H100 PCIe", "H100"), ("NVIDIA L40S", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, n=name: n)
        table = tile_configs.tile_table_for("cuda", tmp_path)
        shipped = dict(tile_configs.SHIPPED.get(family or "", {}))
        if family == "H200":  # its cached sweep wins over the shipped entries
            assert table == {**shipped, **{k: tile_configs.norm_cfg(c) for k, c in swept.items()}}
        else:
            assert table == shipped
        assert tile_configs.tile_table_for("cuda", None) == shipped


def test_fp8_tiles_have_their_own_table(tmp_path, monkeypatch):
    """FP8 weights read their own table (<gpu>-fp8.json over SHIPPED_FP8); a shape it lacks runs the
    bf16 table's tiles, so an empty FP8 table changes nothing."""
    import pytest

    from fusionserve.kernels.batch import Geometry
    from fusionserve.kernels.triton_backend import TritonBackend

    assert dict(tile_configs.tile_table_for("cpu", tmp_path, "fp8")) == {}
    with pytest.raises(ValueError, match="weights"):
        tile_configs.tile_table_for("cpu", tmp_path, "int4")
    assert tile_configs.cache_file(tmp_path, "NVIDIA H200", "fp8").name == "nvidia-h200-fp8.json"
    assert tile_configs.cache_file(tmp_path, "NVIDIA H200").name == "nvidia-h200.json"
    key, fp8_cfg = (6144, 4096, 16, False), (16, 32, 256, 4, 4, 1)
    tile_configs.save_tiles(tile_configs.cache_file(tmp_path, "NVIDIA H200", "fp8"), {key: fp8_cfg})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    fp8_table = tile_configs.tile_table_for("cuda", tmp_path, "fp8")
    assert dict(fp8_table) == {key: fp8_cfg}
    assert tile_configs.tile_table_for("cuda", tmp_path)[key] != fp8_cfg  # bf16 keeps its own

    monkeypatch.setattr(tile_configs, "INTERPRET", False)  # pick_config's table lookups, as on a GPU
    cuda = torch.device("cuda")
    be = TritonBackend(
        Geometry.of(2, 1, 16, EPS), pdl=False, tiles=tile_configs.SHIPPED["H200"], fp8_tiles=fp8_table
    )
    assert be._fp8_config(1, 6144, 4096, cuda, False) == fp8_cfg
    bf16_down = tile_configs.SHIPPED["H200"][(4096, 14336, 16, False)]
    assert be._fp8_config(1, 4096, 14336, cuda, False) == tile_configs.norm_cfg(bf16_down)
