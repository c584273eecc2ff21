"""Programmatic dependent launch (PDL, Hopper and later): start kernel n+1 while kernel n finishes.

A decode step of a small model is a chain of ~6 kernels per layer of a few µs each; with CUDA graphs
the launches are cheap, but every kernel still pays its ramp-up (CTAs scheduled, weight bytes in
flight) after its predecessor's last CTA has retired. Launched with PDL (Triton's `launch_pdl`,
captured by CUDA graphs as programmatic edges), kernel n+1 becomes resident as soon as every program
of kernel n has passed its own `pdl_wait`. Before waiting it may only touch what kernel n cannot have
written: it issues L2 prefetches of its weights (or cached K/V), which are hints and can never return
stale data (L2 is the point of coherence). After `pdl_wait` (kernel n complete, its writes visible)
it reads activations and writes outputs. `pdl_wait` also releases kernel n+2 to launch (grids of one
wave; larger ones do after their main loop), so at most two kernels overlap and the next one's
prefetch runs under this one's tail.

Rules for a kernel launched with PDL (`pdl_args` with a policy): before `pdl_wait(PDL)` no store and no
load of anything a kernel of this step writes; weights, past K/V and the step inputs the host copied
before the step (positions, slots, block tables, context lengths) may be read. tests/test_kernels_pdl.py
checks the compiled PTX. `pdl_available` is false under the CPU interpreter, on GPUs before sm90 and with
a Triton without the griddepcontrol ops; the interpreter compiles the PDL instructions away even when a
test asks for them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fusionserve.kernels.triton_env import INTERPRET, next_pow2, sm_count

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAVE_GDC = True
except ImportError:  # pragma: no cover - depends on the Triton version
    HAVE_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


# The CPU interpreter has neither griddepcontrol nor inline asm: there the PDL branches compile to nothing,
# so the tests can run every kernel with PDL=True and check it computes what PDL=False does.
_ON_GPU = tl.constexpr(not INTERPRET)


@triton.jit
def pdl_wait(PDL: tl.constexpr, EARLY: tl.constexpr = True):
    """Wait for the preceding kernel (complete, writes visible); with EARLY, let the next one launch.

    EARLY suits grids of one wave: the next kernel's programs take the SMs this one leaves idle. A
    grid of several waves calls `pdl_trigger` after its main loop instead (or never: the trigger is
    implicit at exit), or the next kernel's waiting programs would hold SM slots (and shared memory)
    this one's later waves need.
    """
    if PDL and _ON_GPU:
        gdc_wait()
        if EARLY:
            gdc_launch_dependents()


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """Let the next kernel launch (once every program of this one has called this or exited)."""
    if PDL and _ON_GPU:
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, PDL: tl.constexpr):
    """L2 prefetch of the 128-byte lines holding `ptrs` (any shape; every address must be valid)."""
    if PDL and _ON_GPU:
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
        )


def pdl_available(device: torch.device | str) -> bool:
    """PDL by default on sm90+ with a Triton that has the ops; FUSIONSERVE_PDL=0 turns it off (A/B)."""
    device = torch.device(device)
    if INTERPRET or not HAVE_GDC or device.type != "cuda" or not torch.cuda.is_available():
        return False
    if os.environ.get("FUSIONSERVE_PDL", "1") in ("0", "false", "off"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


@dataclass(frozen=True)
class PdlPolicy:
    """How the decode kernels use PDL. The defaults are bench/decode_pdl.py's winners on the H100: on the
    135M model prefetching all of K (32 lines) beat 8 lines and none; on the 8B, 4 KB of every weight row
    thrashed L2 (6% slower), hence the per-GEMM budget; releasing a multi-wave grid's successor after its
    K loop beat releasing it at exit by ~0.5%; counting 2 programs per SM as one wave was 3% slower."""

    prefetch_lines_max: int = 32  # 128-byte lines per weight row a GEMM program prefetches, at most
    prefetch_budget: int = 8 << 20  # weight bytes a whole GEMM prefetches, at most
    prefetch_multiwave: bool = True  # grids of several waves prefetch too (their first wave starts early)
    multiwave_trigger: str = "late"  # several waves: release the successor after the K loop, or at "exit"
    one_wave_programs_per_sm: int = 1  # a grid of up to this many programs per SM counts as one wave
    attention_prefetch_tokens: int = 128  # cached tokens per decode-attention program prefetched

    def one_wave(self, programs: int, device: torch.device) -> bool:
        """Whether a grid fits the SMs in one wave: then its successor may launch at its start."""
        return programs <= self.one_wave_programs_per_sm * sm_count(device)


def pdl_args(policy: PdlPolicy | None, programs: int, device: torch.device) -> dict:
    """The PDL / EARLY constexprs and the launch keyword of one kernel call (policy None: PDL off)."""
    if policy is None:
        return {"PDL": False, "EARLY": False}
    return {"PDL": True, "EARLY": policy.one_wave(programs, device), "launch_pdl": True}


def prefetch_lines(span: int, elt: int, rows: int, policy: PdlPolicy | None, early: bool = True) -> int:
    """128-byte lines per weight row (of `rows` in all, K splits counted) to prefetch before the PDL
    wait: the whole K span of a program, within the policy's lines per row and bytes per GEMM; none
    without PDL, or for a grid of several waves (`early` False) if the policy says so."""
    if policy is None or not (early or policy.prefetch_multiwave):
        return 0
    cap = min(policy.prefetch_lines_max, policy.prefetch_budget // max(1, rows * 128))
    if cap < 1:
        return 0
    return min(1 << (cap.bit_length() - 1), next_pow2(-(-span * elt // 128)))
