"""kernels/layernorm_backend.py: a tiny GPT-NeoX through the Triton backend (decode-size Triton GEMMs
with the deferred LayerNorm, and the cuBLAS + row-pass path past small_m_max) against the torch
reference backend, fused and off, parallel and sequential residual, partial and full rotary."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels.backend import TorchBackend  # noqa: E402
from fusionserve.kernels.triton_backend import TritonBackend  # noqa: E402
from fusionserve.models.decoder import Decoder, geometry  # noqa: E402
from fusionserve.models.loader import load_weights  # noqa: E402
from tests.kernels.common import DEVICE, INTERPRET  # noqa: F401  (sets TRITON_INTERPRET first)
from tests.tiny_models import make_tiny_neox, rel_err  # noqa: E402
from tests.tiny_models import prefill_then_decode_logits as run


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
