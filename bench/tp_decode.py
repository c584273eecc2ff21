"""Decode latency with tensor parallelism (models/tensor_parallel.py): TP=1 vs TP=N in one call.

Each rank builds only its shard, with random weights of the real shapes (the full model is never
materialized), fills a paged KV cache for `batch` sequences at `ctx`, and times eager decode steps
(forward + LM head, CUDA events, medians). TP=1 is timed the same eager way and also as the
product's CUDA-graph replay: with N > 1 the engine runs eagerly today (docs/DESIGN.md, "Tensor
parallelism"), so "TP=N eager vs TP=1 graphs" is the honest serving comparison and "eager vs eager"
the collectives' own cost.

    python bench/tp_decode.py --model 8b --tp 2 --batches 1,8 --ctx 512     # needs N GPUs (NCCL)
    python bench/tp_decode.py --dry                                          # CPU smoke test (gloo)

Writes bench/results/tp_decode_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table, write_results  # noqa: E402
from bench.decode import config_of, decode_batch, filled_kv_cache, random_weights  # noqa: E402
from fusionserve.kernels.backend import select_backend  # noqa: E402
from fusionserve.models.config import ModelConfig  # noqa: E402
from fusionserve.models.decoder import Decoder, geometry  # noqa: E402
from fusionserve.models.tensor_parallel import TensorParallel, check_divisible, local_config  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=1024)  # fmt: skip


def model_config(name: str) -> ModelConfig:
    if name == "tiny":
        return ModelConfig(architecture="LlamaForCausalLM", dtype=torch.float32, **TINY)
    return config_of(name)


def step_ms(model: Decoder, batch: int, ctx: int, steps: int) -> float:
    """Median ms of eager decode steps (forward + LM head) at `batch` × `ctx`."""
    kv = filled_kv_cache(model, batch, ctx)
    pb, ids, pos = decode_batch(batch, ctx, 16, model.device)
    ids = ids % model.tp.vocab_size if model.tp else ids % model.weights.embed.shape[0]
    cuda = model.device.type == "cuda"
    times = []
    for i in range(steps + 3):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.logits(model.forward(ids, pos, pb, kv, fusion=True))
        if cuda:
            torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rank_model(cfg: ModelConfig, tp: TensorParallel | None, device: torch.device, max_len: int) -> Decoder:
    """This rank's shard only: local heads and MLP columns, ⌈V/N⌉ vocabulary rows, random weights."""
    n = tp.world_size if tp else 1
    local = local_config(cfg, n)
    weights = random_weights(
        dataclasses.replace(local, vocab_size=-(-cfg.vocab_size // n)), device=str(device)
    )
    return Decoder(local, weights, select_backend(device, geometry(local)), max_model_len=max_len, tp=tp)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    dev = torch.device(f"cuda:{rank}") if torch.cuda.is_available() and not args.dry else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = model_config(args.model)
        model = rank_model(cfg, TensorParallel(rank, world, cfg.vocab_size), dev, args.ctx + 16)
        rows = {b: step_ms(model, b, args.ctx, args.steps) for b in args.batches}
        if rank == 0:
            torch.save(rows, out)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="8b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dry", action="store_true", help="CPU, gloo, the tiny shape: a smoke test")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    if args.dry:
        args.model, args.ctx, args.steps = "tiny", 32, 3
    args.batches = [int(b) for b in str(args.batches).split(",")]
    cfg = model_config(args.model)
    check_divisible(cfg, args.tp)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.dry else "cpu")
    one = rank_model(cfg, None, dev, args.ctx + 16)
    eager1 = {b: step_ms(one, b, args.ctx, args.steps) for b in args.batches}
    graphs1 = {}
    if dev.type == "cuda":
        from bench.decode import best_of_interleaved

        for b in args.batches:
            kv = filled_kv_cache(one, b, args.ctx)
            # ends in logits, as the TP=N eager steps do (step_ms)
            best = best_of_interleaved(
                one, kv, b, args.ctx, {"": None}, lambda _: None, (True,), 2, tokens=False
            )
            graphs1[b] = best[("", True)]
    del one
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(args.out or "/tmp") / f"tp{args.tp}_rows.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank, args=(args.tp, port, args, str(out)), nprocs=args.tp)
    tpn = torch.load(out)
    rows = [
        [args.model, b, args.ctx, graphs1.get(b, "-"), round(eager1[b], 3), round(tpn[b], 3),
         f"{(graphs1.get(b) or eager1[b]) / tpn[b]:.2f}x"]
        for b in args.batches
    ]  # fmt: skip
    env = environment()
    table = (
        f"Decode step (ms), {env.get('gpu') or 'CPU'}, fused path, random weights, medians; TP={args.tp} "
        f"eager (no CUDA graphs yet with TP), {env['date']}\n\n"
        + markdown_table(
            [
                "model",
                "batch",
                "ctx",
                "TP=1 graphs",
                "TP=1 eager",
                f"TP={args.tp} eager",
                "speed-up vs best TP=1",
            ],
            rows,
        )
    )
    payload = {
        "env": env,
        "tp": args.tp,
        "tp1_graphs_ms": graphs1,
        "tp1_eager_ms": eager1,
        "tpn_eager_ms": tpn,
    }
    write_results(f"tp_decode_{args.model}{'_dry' if args.dry else ''}", payload, table, out=args.out)
    print(table)


if __name__ == "__main__":
    main()
