"""One decoder over N processes: the engine process is rank 0 and leads, ranks 1..N-1 follow.

The scheduler runs once, in the engine; `LeaderDecoder` stands in for the Decoder there and, before
each call that runs collectives (allocate the KV cache, forward, logits), broadcasts the call and its
small inputs (token ids, positions, the paged batch, the logit rows: an int64 header and one int64
payload, on the device) to the followers, which replay it on their shard (models/tensor_parallel.py). Followers are plain subprocesses
(`python -m fusionserve.models.tp_group`), so a daemonic engine process may start them; NCCL joins
them on CUDA (rank r on cuda:r), gloo on CPU.

Failure: a watchdog thread in the leader checks the followers; one that exits takes the engine down
at once (exit status 3), so the server's supervision restarts the whole group, and a follower whose
leader is gone exits on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from fusionserve.kernels.backend import select_backend
from fusionserve.kernels.batch import Draw, PagedBatch
from fusionserve.kernels.fp8 import Fp8Weight
from fusionserve.models.config import load_config
from fusionserve.models.decoder import Decoder, Hidden, geometry, resolve_device, resolve_dtype
from fusionserve.models.loader import ModelWeights, load_weights
from fusionserve.models.registry import fusionserve_home
from fusionserve.models.tensor_parallel import TensorParallel, check_divisible, shard

log = logging.getLogger("fusionserve.tp")

#: Followers and the leader give up on a collective after this long (a wedged peer).
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """What every rank needs to build its shard and join the group."""

    model_dir: str
    world_size: int
    init_method: str
    device: str  # "cpu" or "cuda" (rank r takes cuda:r)
    dtype: str | None
    quantization: str
    backend: str
    max_model_len: int | None


@dataclasses.dataclass
class _RowsHidden(Hidden):
    """A Hidden that remembers which rows of the forward's output it holds (the followers select
    the same rows for their share of the LM head)."""

    index: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> _RowsHidden:
        picked = super().rows(index)
        whole = index if self.index is None else self.index[index]
        return _RowsHidden(picked.h, picked.stats, whole)


def _to_device(weights: ModelWeights, device: torch.device) -> ModelWeights:
    def move(t):
        if isinstance(t, Fp8Weight):
            return Fp8Weight(t.data.to(device), t.scale.to(device))
        return t.to(device) if isinstance(t, torch.Tensor) else t

    layers = [
        dataclasses.replace(
            layer, **{f.name: move(getattr(layer, f.name)) for f in dataclasses.fields(layer)}
        )
        for layer in weights.layers
    ]
    fields = {
        f.name: move(getattr(weights, f.name)) for f in dataclasses.fields(weights) if f.name != "layers"
    }
    return dataclasses.replace(weights, layers=layers, **fields)


def build_rank(spec: GroupSpec, rank: int) -> Decoder:
    """Join the group and load this rank's shard (read on the CPU, sliced, then placed)."""
    device = torch.device(f"cuda:{rank}") if spec.device.startswith("cuda") else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=spec.init_method,
        rank=rank,
        world_size=spec.world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    dtype = resolve_dtype(spec.dtype, device)
    cfg, weights = load_weights(
        spec.model_dir, dtype=dtype, progress=rank == 0, quantization=spec.quantization
    )
    tp = TensorParallel(rank, spec.world_size, cfg.vocab_size)
    local_cfg, local = shard(cfg, weights, rank, spec.world_size)
    backend = select_backend(device, geometry(local_cfg), spec.backend, fusionserve_home() / "tiles")
    return Decoder(local_cfg, _to_device(local, device), backend, spec.max_model_len, tp=tp)


# -- the calls on the wire: a fixed int64 header, then one int64 payload (both on the ranks' device,
# so NCCL moves them without a host round trip: two small broadcasts per call) -----------------------
_STOP, _ALLOC, _FORWARD, _LOGITS = range(4)
_HEADER = 10


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    dist.broadcast(t, src=0)
    return t


def _send(device: torch.device, op: int, *fields: int, payload: list[torch.Tensor] = ()) -> None:
    """Leader side: the header (op, up to 8 integers, the payload's length last) and the payload's
    tensors, flattened."""
    flat = torch.cat([t.reshape(-1).to(device, torch.int64) for t in payload]) if payload else None
    head = [op, *fields] + [0] * (_HEADER - 2 - len(fields)) + [flat.numel() if flat is not None else 0]
    _broadcast(torch.tensor(head, dtype=torch.int64, device=device))
    if flat is not None and flat.numel():
        _broadcast(flat)


def _send_forward(device, ids, positions, batch, fusion: bool) -> None:
    b, w = batch.block_tables.shape
    _send(
        device, _FORWARD, int(fusion), ids.numel(), b, w, batch.max_query_len, batch.max_context_len,
        batch.block_size, batch.num_decodes,
        payload=[ids, positions, batch.query_start, batch.context_lens, batch.block_tables, batch.slot_mapping],
    )  # fmt: skip


def _recv_forward(head: list[int], flat: torch.Tensor):
    fusion, t, b, w, max_q, max_ctx, bs, n_dec = head[1:9]
    parts = torch.split(flat, [t, t, b + 1, b, b * w, t])
    i32 = [p.to(torch.int32) for p in parts[2:5]]
    batch = PagedBatch(i32[0], i32[1], i32[2].view(b, w), parts[5].contiguous(), max_q, max_ctx, bs, n_dec)
    return parts[0].contiguous(), parts[1].contiguous(), batch, bool(fusion)


class LeaderDecoder:
    """The engine's decoder on rank 0: every collective call goes to the followers first."""

    def __init__(self, decoder: Decoder, followers: list[subprocess.Popen]):
        self.decoder = decoder
        self.followers = followers
        self._stopping = False
        threading.Thread(target=self._watch, name="fusionserve-tp-watch", daemon=True).start()

    def __getattr__(self, name: str):  # config, device, dtype, max_model_len, backend, weights
        return getattr(self.decoder, name)

    def _watch(self) -> None:
        while not self._stopping:
            for rank, proc in enumerate(self.followers, start=1):
                if proc.poll() is not None and not self._stopping:
                    log.error(
                        "tensor-parallel rank %d exited (status %s): stopping the engine",
                        rank,
                        proc.returncode,
                    )
                    os._exit(3)
            time.sleep(0.2)

    def allocate_kv_cache(self, num_blocks: int, block_size: int = 16):
        _send(self.decoder.device, _ALLOC, num_blocks, block_size)
        return self.decoder.allocate_kv_cache(num_blocks, block_size)

    def forward(self, ids, positions, batch, kv, fusion: bool = True, timer=None) -> _RowsHidden:
        _send_forward(self.decoder.device, ids, positions, batch, fusion)
        hidden = self.decoder.forward(ids, positions, batch, kv, fusion, timer)
        return _RowsHidden(hidden.h, hidden.stats)

    def logits(self, hidden: Hidden, scaled: bool = True, draw: Draw | None = None) -> torch.Tensor:
        """The followers join the vocab-parallel gather; a `draw` (FlashSampling) is then taken from
        the gathered logits on rank 0 alone (Decoder.logits does that for a tensor-parallel rank)."""
        index = getattr(hidden, "index", None)
        payload = [index] if index is not None else []
        _send(self.decoder.device, _LOGITS, int(scaled), int(index is not None), payload=payload)
        return self.decoder.logits(hidden, scaled, draw)

    def shutdown(self) -> None:
        self._stopping = True
        _send(self.decoder.device, _STOP)
        for proc in self.followers:
            proc.wait(timeout=30)


def follow(spec: GroupSpec, rank: int) -> None:
    """A follower's life: build the shard, then replay the leader's calls until told to stop."""
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    decoder = build_rank(spec, rank)
    dev = decoder.device
    kv = hidden = None
    while True:
        head = _broadcast(torch.zeros(_HEADER, dtype=torch.int64, device=dev)).tolist()
        n = head[-1]
        flat = _broadcast(torch.empty(n, dtype=torch.int64, device=dev)) if n else None
        if head[0] == _STOP:
            break
        if head[0] == _ALLOC:
            kv = decoder.allocate_kv_cache(head[1], head[2])
        elif head[0] == _FORWARD:
            ids, positions, batch, fusion = _recv_forward(head, flat)
            hidden = decoder.forward(ids, positions, batch, kv, fusion)
        elif head[0] == _LOGITS:
            decoder.logits(hidden.rows(flat) if head[2] else hidden, bool(head[1]))
    dist.destroy_process_group()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_group(
    model_dir: str, world_size: int, device: str, dtype: str | None, quantization: str, backend: str,
    max_model_len: int | None,
) -> LeaderDecoder:  # fmt: skip
    """Start ranks 1..N-1 as subprocesses, join as rank 0, and return the leader's decoder."""
    check_divisible(load_config(model_dir), world_size)  # before any process or weight
    dev = resolve_device(device)
    if dev.type == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"tensor parallel size {world_size} needs {world_size} GPUs; {torch.cuda.device_count()} visible"
        )
    spec = GroupSpec(
        str(model_dir), world_size, f"tcp://127.0.0.1:{_free_port()}", dev.type, dtype, quantization, backend,
        max_model_len,
    )  # fmt: skip
    payload = json.dumps(dataclasses.asdict(spec))
    followers = [
        subprocess.Popen(
            [sys.executable, "-m", "fusionserve.models.tp_group", "--spec", payload, "--rank", str(r)]
        )
        for r in range(1, world_size)
    ]
    try:
        decoder = build_rank(spec, 0)
    except BaseException:
        for proc in followers:
            proc.kill()
        raise
    return LeaderDecoder(decoder, followers)


def main() -> None:
    ap = argparse.ArgumentParser(description="a tensor-parallel follower rank (started by the engine)")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--rank", type=int, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    follow(GroupSpec(**json.loads(args.spec)), args.rank)


if __name__ == "__main__":
    main()
