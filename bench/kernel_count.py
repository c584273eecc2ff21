"""Kernel launches per decode step, counted on CPU: what a CUDA graph of the step would hold.

The decode step of the Triton backend runs under the Triton interpreter on a model with the real
shape's layer structure (layer count, heads, GQA, head size) but narrow widths, so it takes seconds;
every Triton launch and every torch op that would launch a GPU kernel (views and allocations do not)
is counted by name. The streaming-multiprocessor count the split decisions read is the H200's (132);
the interpreter's decode-attention plan uses smaller chunks, so only batch sizes where it takes the
same launch shape as the device (one fused-merge launch at batch 1, split + merge at batch 8) are
defaults. Variants: `fused` (the product: RoPE and the
KV write in the qkv GEMM, tokens drawn in the LM head), `fused-before` (the separate rope_kv pass and
a sampler argmax over written logits: this stop's starting point), `off` (the unfused path + argmax).

    python bench/kernel_count.py --models 135m,8b --batches 1,8 [--out DIR]

It is a count, not a timing: bench/decode.py --profile measures the same steps on the GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fusionserve.kernels.triton_env as triton_env  # noqa: E402
from bench.common import markdown_table, write_results  # noqa: E402
from bench.decode import ARCHS, decode_batch, greedy_draw, random_weights  # noqa: E402
from fusionserve.kernels.backend import draw_tokens  # noqa: E402
from fusionserve.kernels.triton_backend import TritonBackend  # noqa: E402
from fusionserve.models.config import ModelConfig  # noqa: E402
from fusionserve.models.decoder import Decoder, geometry  # noqa: E402

# torch ops that launch nothing on a GPU (metadata, views, allocation without a fill)
NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "slice", "select", "t", "transpose", "permute",
    "expand", "as_strided", "detach", "alias", "empty", "empty_strided", "empty_like", "unsqueeze", "squeeze",
    "split", "split_with_sizes", "unbind", "lift_fresh", "view_as", "_to_copy_noop", "new_empty", "narrow",
    "_local_scalar_dense", "is_nonzero", "sym_size", "sym_stride", "dim", "numel", "size", "stride",
}  # fmt: skip


class LaunchCounter(TorchDispatchMode):
    """Counts torch ops that would launch a kernel, and (patched in by `counting`) Triton launches."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: Counter[str] = Counter()
        self.inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        aliased = isinstance(out, torch.Tensor) and args and out is args[0]  # .float() of an fp32 tensor
        if not self.inside_triton and name not in NO_KERNEL and not aliased:
            self.launches[f"torch.{name}"] += 1
        return out


def counting(counter: LaunchCounter):
    """Patch the interpreter's launch so every Triton kernel launch is counted once by its name."""
    original = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        counter.launches[f"triton.{self.fn.__name__}"] += 1
        counter.inside_triton += 1
        try:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            counter.inside_triton -= 1

    interpreter.InterpretedFunction.run = run
    return original


def narrow_config(name: str) -> ModelConfig:
    """The shape's layer structure with narrow widths (head size kept: RoPE's pair tiles depend on it)."""
    a = dict(ARCHS[name])
    a.update(vocab_size=512, hidden_size=64, intermediate_size=128)
    return ModelConfig(architecture="LlamaForCausalLM", dtype=torch.float32, **a)


def random_model(cfg: ModelConfig, rope_in_gemm: bool) -> Decoder:
    backend = TritonBackend(geometry(cfg), rope_in_gemm=rope_in_gemm)
    return Decoder(cfg, random_weights(cfg, "cpu", cfg.dtype), backend, max_model_len=1024)


def count_step(model: Decoder, batch: int, ctx: int, fused: bool, flash: bool) -> Counter[str]:
    kv = model.allocate_kv_cache(batch * -(-(ctx + 1) // 16), 16)
    for t in kv.k + kv.v:  # attention reads the whole context: keep it finite
        t.normal_()
    pb, ids, pos = decode_batch(batch, ctx, 16, "cpu")
    draw = greedy_draw(batch, "cpu")

    def step() -> None:
        with torch.inference_mode():
            hidden = model.forward(ids, pos, pb, kv, fusion=fused)
            if flash:
                model.logits(hidden, draw=draw)
            else:
                draw_tokens(model.logits(hidden), draw)

    step()  # first-use allocations (arrival counters) are not part of a captured step
    counter = LaunchCounter()
    original = counting(counter)
    try:
        with counter:
            step()
    finally:
        interpreter.InterpretedFunction.run = original
    return counter.launches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="135m,8b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--sms", type=int, default=132, help="SM count the split plans assume (H200: 132)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    triton_env._SM_COUNT.clear()
    triton_env.sm_count = lambda device: args.sms  # the device's split plans, not the interpreter's
    torch.manual_seed(0)
    rows, details = [], []
    variants = {
        "fused": (True, True, True),
        "fused-before": (True, False, False),
        "off": (False, False, False),
    }
    for name in args.models.split(","):
        cfg = narrow_config(name)
        for batch in (int(b) for b in args.batches.split(",")):
            row = dict(model=name, layers=cfg.num_layers, batch=batch, ctx=args.ctx)
            for label, (fused, rope_in_gemm, flash) in variants.items():
                launches = count_step(random_model(cfg, rope_in_gemm), batch, args.ctx, fused, flash)
                row[label] = sum(launches.values())
                details.append(dict(model=name, batch=batch, variant=label, launches=dict(launches)))
            rows.append(row)
            print(row, flush=True)
    cols = ["model", "layers", "batch", "ctx", "fused", "fused-before", "off"]
    table = markdown_table(cols, [[r[c] for c in cols] for r in rows])
    note = (
        f"Kernel launches per decode step (counted on CPU under the Triton interpreter, split plans for "
        f"{args.sms} SMs; narrow widths, real layer structure). fused-before: RoPE/KV as a separate pass "
        "and an argmax over written logits.\n\n"
    )
    write_results("kernel_count", {"rows": rows, "launches": details}, note + table, args.out)
    print(note + table)


if __name__ == "__main__":
    main()
