"""kernels/token_bitmask.py: a grammar's token bitmask applied in place to chosen rows, vs the torch
reference and vs the bits themselves (padded vocabulary past the mask always masked)."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels import reference as ref
from fusionserve.kernels.token_bitmask import apply_token_bitmask
from tests.kernels.common import DEVICE


@pytest.mark.parametrize("vocab,words", [(100, 4), (100, 3), (1000, 32)])
def test_token_bitmask(vocab, words):
    torch.manual_seed(0)
    logits = torch.randn(5, vocab, device=DEVICE)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, words), dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    got, want = logits.clone(), logits.clone().cpu()
    apply_token_bitmask(got, bitmask, rows)
    ref.token_bitmask(want, bitmask.cpu(), rows.cpu())
    got = got.cpu()
    assert torch.equal(got, want)
    for i, r in enumerate(rows.tolist()):
        bits = [(int(bitmask[i, t // 32]) >> (t % 32)) & 1 if t < 32 * words else 0 for t in range(vocab)]
        assert [x != float("-inf") for x in got[r].tolist()] == [b == 1 for b in bits]
        assert torch.equal(
            got[r][torch.tensor(bits, dtype=torch.bool)],
            logits.cpu()[r][torch.tensor(bits, dtype=torch.bool)],
        )
    untouched = [1, 2, 4]
    assert torch.equal(got[untouched], logits.cpu()[untouched])
