"""Compile the PDL kernels for sm90 on a machine without a GPU and summarise their PTX (JSON on stdout).

Run in its own process with TRITON_INTERPRET=0 (the test suite's process runs the interpreter, whose
kernels cannot be compiled). For each kernel: griddepcontrol.wait / launch_dependents / L2 prefetch
counts, and how many global stores, atomics and prefetches come before the wait in program text.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

import fusionserve.kernels.triton_env as env  # noqa: E402

env.INTERPRET = False
from fusionserve.kernels import decode_attention, decode_merge, embedding, norm_linear, rmsnorm, rope_kv  # noqa: E402

FLOATS = {"inv_k", "eps", "qk_scale"}
F32 = {
    "stats_ptr",
    "sums_ptr",
    "colsum_ptr",
    "stats_out_ptr",
    "sums_out_ptr",
    "ws_ptr",
    "po_ptr",
    "pml_ptr",
    "cs_ptr",
    "wscale_ptr",
    "amax_ptr",
    "amax_out_ptr",
    "temp_ptr",
}
INTS = {
    "cnt_ptr": "*i32",
    "bt_ptr": "*i32",
    "ctx_ptr": "*i32",
    "slot_ptr": "*i64",
    "pos_ptr": "*i64",
    "ids_ptr": "*i64",
    "key_ptr": "*i64",
    "argkey_ptr": "*i64",
    "scnt_ptr": "*i32",
}


def signature(fn, consts: dict, types: dict | None = None) -> dict:
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if types and name in types:
            sig[name] = types[name]
        elif name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = INTS.get(name, "*fp32" if name in F32 else "*bf16")
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def summarise(fn, consts: dict, **options) -> dict:
    types = consts.pop("_types", None)
    src = triton.compiler.ASTSource(fn=fn, signature=signature(fn, consts, types), constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"launch_pdl": True, **options})
    ptx = compiled.asm["ptx"]
    wait_at = ptx.find("griddepcontrol.wait")
    head = ptx[:wait_at] if wait_at >= 0 else ptx
    return {
        "launch_pdl": bool(compiled.metadata.launch_pdl),
        "wait": ptx.count("griddepcontrol.wait"),
        "launch_dependents": ptx.count("griddepcontrol.launch_dependents"),
        "prefetch": ptx.count("prefetch.global.L2"),
        "prefetch_before_wait": head.count("prefetch.global.L2"),
        "stores_before_wait": len(re.findall(r"\bst\.global|\bred\.global|\batom\.global", head)),
        "loads_before_wait": len(re.findall(r"\bld\.global", head)),
    }


LINEAR = dict(HAS_BIAS=False, HAS_RES=True, HAS_SCALE=True, LN=False, WANT_STATS=True, WANT_SUMS=False, GELU=0,
              EVEN_K=True, UPCAST=False, IEEE=False, BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, BLOCK_P=64, PDL=True,
              PF_LINES=16, LINE=64, W_FP8=False, WANT_AMAX=False, BLOCK_PA=1, SAMPLE=0, SLOTS=1, KEEP_FLAGGED=False, HEAD_D=2, HALF=1)  # fmt: skip
DECODE = dict(GROUP=3, D=64, BLOCK_G=16, BLOCK_D=64, BLOCK_N=128, PAGE=16, SPLIT=True, BLOCK_GG=4, MERGE_S=32,
              UPCAST=False, IEEE=False, PDL=True, PF_TOKENS=128, D_LINES=1, LINE=64, WANT_AMAX=False)  # fmt: skip
CASES = {
    "linear one-wave": (norm_linear._linear_kernel, dict(LINEAR, PAIR=0, SPLIT_K=1, EARLY=True, LATE_TRIGGER=False)),
    "gate_up one-wave": (norm_linear._linear_kernel, dict(LINEAR, PAIR=1, SPLIT_K=1, EARLY=True, LATE_TRIGGER=False)),
    "linear split-K multi-wave": (norm_linear._linear_kernel, dict(LINEAR, PAIR=0, SPLIT_K=4, EARLY=False, LATE_TRIGGER=True)),
    # e4m3 weights (fp8 tl.dot), per-token activation scale from max|x| partials, max|y| out
    "linear fp8": (norm_linear._linear_kernel, dict(LINEAR, PAIR=0, SPLIT_K=1, EARLY=True, LATE_TRIGGER=False,
                                                    W_FP8=True, WANT_AMAX=True, BLOCK_PA=64, LINE=128,
                                                    _types={"w_ptr": "*fp8e4nv"})),
    "gate_up fp8": (norm_linear._linear_kernel, dict(LINEAR, PAIR=1, SPLIT_K=2, EARLY=False, LATE_TRIGGER=True,
                                                     W_FP8=True, BLOCK_PA=64, LINE=128, _types={"w_ptr": "*fp8e4nv"})),
    # FlashSampling: the LM head draws the token (Philox Gumbel-max, cross-tile argmax by the last program)
    "lm head flash sampling": (norm_linear._linear_kernel, dict(LINEAR, PAIR=0, SPLIT_K=1, EARLY=False,
                                                                LATE_TRIGGER=True, HAS_RES=False, WANT_STATS=False,
                                                                SAMPLE=2, SLOTS=64, KEEP_FLAGGED=True, _types={"y_ptr": "*i64"})),
    # RoPE + the paged KV write in the qkv GEMM's epilogue (pair tiles HALF rows apart)
    "qkv rope + kv write": (norm_linear._linear_kernel, dict(LINEAR, PAIR=2, HEAD_D=64, HALF=32, SPLIT_K=1, EARLY=True,
                                                             LATE_TRIGGER=False, HAS_RES=False, WANT_STATS=False,
                                                             HAS_BIAS=True)),
    "decode attention fused merge": (decode_attention._decode_kernel, dict(DECODE, FUSED=True, EARLY=True)),
    "decode attention two-pass": (decode_attention._decode_kernel, dict(DECODE, FUSED=False, EARLY=True)),
    # FP8 o_proj's per-token scale partials written by the attention epilogue (max|o| per head)
    "decode attention fused merge + max|o|": (decode_attention._decode_kernel, dict(DECODE, FUSED=True, EARLY=True,
                                                                                   WANT_AMAX=True)),
    "decode reduce": (decode_merge._decode_reduce_kernel, dict(D=64, BLOCK_D=64, BLOCK_S=8, PDL=True, EARLY=True, WANT_AMAX=False)),
    "rope + kv write": (rope_kv._rope_kv_kernel, dict(D=64, HALF=32, HAS_SCALE=True, HAS_BIAS=False, BLOCK_HQ=16,
                                                     BLOCK_HK=4, BLOCK_HALF=32, BLOCK_PASS=1, BLOCK_D=64, BLOCK_P=1, PDL=True, EARLY=True)),
    "embedding": (embedding._embedding_kernel, dict(WANT_STATS=True, BLOCK=1024, PDL=True, EARLY=True)),
    "rmsnorm": (rmsnorm._norm_kernel, dict(HAS_RES=False, HAS_W=False, HAS_B=False, LAYER=False, BLOCK=1024,
                                          PDL=True, EARLY=False)),
}  # fmt: skip


if __name__ == "__main__":
    print(json.dumps({name: summarise(fn, consts, num_warps=4) for name, (fn, consts) in CASES.items()}))
