"""kernels/fp8_backend.py: a tiny Llama with FP8 weights through the Triton backend (decode-size GEMMs
quantizing per token from their producers' max|h| partials, and the quantize + scaled-GEMM path past
small_m_max) against the torch reference backend's FP8 arithmetic, fused and off."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels.backend import TorchBackend  # noqa: E402
from fusionserve.kernels.batch import Rotary  # noqa: E402
from fusionserve.kernels.fp8 import Fp8Weight  # noqa: E402
from fusionserve.kernels.triton_backend import TritonBackend  # noqa: E402
from fusionserve.models.decoder import Decoder, geometry  # noqa: E402
from fusionserve.models.loader import load_weights  # noqa: E402
from tests.kernels.common import DEVICE, INTERPRET  # noqa: F401  (sets TRITON_INTERPRET first)
from tests.tiny_models import make_tiny_checkpoint, rel_err  # noqa: E402
from tests.tiny_models import prefill_then_decode_logits as run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("fp8") / "m")


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory):
    """Head size 32: RoPE and the KV write ride in the FP8 qkv GEMM's epilogue at decode sizes."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("fp8w") / "m", head_dim=32, num_layers=1)


def test_fp8_weights_are_per_channel_e4m3(tiny):
    cfg, weights = load_weights(tiny, dtype=torch.float32, progress=False, quantization="fp8")
    w = weights.layers[0].w_qkv
    assert cfg.quantization == "fp8" and isinstance(w, Fp8Weight)
    assert w.data.dtype == torch.float8_e4m3fn and w.scale.shape == (w.shape[0],)
    assert torch.allclose(w.data.float().abs().amax(1), torch.full((w.shape[0],), 448.0))
    assert not isinstance(weights.lm_head, Fp8Weight)  # the LM head stays in the model's dtype


@pytest.mark.parametrize("fusion", [True, False])
def test_triton_fp8_model_matches_the_reference(tiny, fusion):
    cfg, weights = load_weights(tiny, dtype=torch.float32, device=DEVICE, progress=False, quantization="fp8")
    ref_cfg, ref_weights = load_weights(tiny, dtype=torch.float32, progress=False, quantization="fp8")
    ids = torch.randint(3, 256, (45,), generator=torch.Generator().manual_seed(3))
    want = run(Decoder(ref_cfg, ref_weights, TorchBackend(geometry(ref_cfg))), ids, fusion)
    triton = Decoder(cfg, weights, TritonBackend(geometry(cfg), pdl=False))
    assert rel_err(run(triton, ids, fusion), want) <= 1e-2  # an e4m3 tie may round either way
    # fused and off quantize the same values (h vs r·h: r cancels in x / s_x)
    other = run(triton, ids, not fusion)
    assert torch.equal(other.argmax(-1), want.argmax(-1))


def test_fp8_rope_in_the_qkv_epilogue_matches_the_reference(wide_heads):
    cfg, weights = load_weights(
        wide_heads, dtype=torch.float32, device=DEVICE, progress=False, quantization="fp8"
    )
    ref_cfg, ref_weights = load_weights(wide_heads, dtype=torch.float32, progress=False, quantization="fp8")
    assert cfg.head_dim == 32
    ids = torch.randint(3, 256, (45,), generator=torch.Generator().manual_seed(4))
    want = run(Decoder(ref_cfg, ref_weights, TorchBackend(geometry(ref_cfg))), ids, True)
    for rope_in_gemm in (True, False):
        be = TritonBackend(geometry(cfg), pdl=False, rope_in_gemm=rope_in_gemm)
        assert (be._rope_write(Rotary(None, torch.zeros(1, 32)), None) is not None) == rope_in_gemm
        assert rel_err(run(Decoder(cfg, weights, be), ids, True), want) <= 1e-2


def test_gate_up_hands_max_act_to_the_down_projection(tiny):
    """At decode sizes the gate/up epilogue writes max|act| partials (its FP8 consumer's scale), so
    down_proj needs no amax pass; they equal act's own max exactly."""
    cfg, weights = load_weights(tiny, dtype=torch.float32, device=DEVICE, progress=False, quantization="fp8")
    be = TritonBackend(geometry(cfg), pdl=False)
    x = torch.randn(3, cfg.hidden_size, device=DEVICE)
    act, amax = be.mlp_input(x, None, weights.layers[0].w_gate_up)
    assert torch.equal(amax.amax(-1), act.abs().amax(-1))
    y, _ = be.linear(act, weights.layers[0].w_down, x_stats=amax)
    want, _ = TorchBackend(geometry(cfg)).linear(act, weights.layers[0].w_down)
    assert rel_err(y, want) <= 1e-2


def test_fused_fp8_decode_step_runs_no_amax_pass(tiny, monkeypatch):
    """A fused FP8 decode step takes every per-token scale from an epilogue: the producers' (qkv,
    gate/up inputs), gate/up's (down_proj) and the decode attention kernel's (o_proj); only layer 0's
    input, the embedding rows, is measured by one pass. The unfused path measures its two normalized
    inputs per layer with the amax pass."""
    from fusionserve.kernels import fp8_backend
    from fusionserve.kernels.batch import contiguous_batch

    cfg, weights = load_weights(tiny, dtype=torch.float32, device=DEVICE, progress=False, quantization="fp8")
    model = Decoder(cfg, weights, TritonBackend(geometry(cfg), pdl=False))
    calls = []
    real = fp8_backend.amax_rows
    monkeypatch.setattr(fp8_backend, "amax_rows", lambda x: calls.append(x.shape) or real(x))
    kv = model.allocate_kv_cache(4, 16)
    ids = torch.tensor([5, 7, 9], device=DEVICE)
    model.forward(
        ids, torch.arange(3, device=DEVICE), contiguous_batch([3], [3], 16).to(DEVICE), kv, fusion=True
    )
    for fusion, passes in ((True, 1), (False, 2 * cfg.num_layers)):
        calls.clear()
        batch = contiguous_batch([1], [4], 16).to(DEVICE)
        model.forward(ids[:1], torch.tensor([3], device=DEVICE), batch, kv, fusion=fusion)
        assert len(calls) == passes, (fusion, calls)
