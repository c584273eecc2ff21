"""kernels/layernorm_backend.py: a tiny GPT-NeoX through the Triton backend (decode-size Triton GEMMs
with the deferred LayerNorm, and the cuBLAS + row-pass path past small_m_max) against the torch
reference backend, fused and off, parallel and sequential residual, partial and full rotary."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels.backend import TorchBackend  # noqa: E402
from fusionserve.kernels.batch import contiguous_batch  # noqa: E402
from fusionserve.kernels.triton_backend import TritonBackend  # noqa: E402
from fusionserve.models.decoder import Decoder, geometry  # noqa: E402
from fusionserve.models.loader import load_weights  # noqa: E402
from tests.kernels.common import DEVICE, INTERPRET  # noqa: F401  (sets TRITON_INTERPRET first)
from tests.tiny_models import make_tiny_neox, rel_err  # noqa: E402


def run(model: Decoder, ids: torch.Tensor, fusion: bool) -> torch.Tensor:
    """A 40-token prefill (past small_m_max) then 5 decode steps (the Triton GEMMs): every row's logits."""
    kv = model.allocate_kv_cache(8, 16)
    out = []
    for a, b in [(0, 40)] + [(p, p + 1) for p in range(40, 45)]:
        batch = contiguous_batch([b - a], [b], 16).to(model.device)
        pos = torch.arange(a, b, device=model.device)
        out.append(
            model.logits(model.forward(ids[a:b].to(model.device), pos, batch, kv, fusion=fusion)).cpu()
        )
    return torch.cat(out)


@pytest.mark.parametrize("parallel,rotary_pct", [(True, 0.25), (False, 1.0)])
def test_triton_layernorm_model_matches_the_reference(tmp_path, parallel, rotary_pct):
    path = make_tiny_neox(tmp_path / "m", parallel=parallel, rotary_pct=rotary_pct)
    cfg, weights = load_weights(path, dtype=torch.float32, device=DEVICE, progress=False)
    ref_cfg, ref_weights = load_weights(path, dtype=torch.float32, progress=False)
    ids = torch.randint(3, 256, (45,), generator=torch.Generator().manual_seed(3))
    want = run(Decoder(ref_cfg, ref_weights, TorchBackend(geometry(ref_cfg))), ids, fusion=False)
    triton = Decoder(cfg, weights, TritonBackend(geometry(cfg), pdl=False))
    for fusion in (True, False):
        assert rel_err(run(triton, ids, fusion), want) <= 1e-4, fusion
