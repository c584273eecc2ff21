"""One decoder over N processes: the engine process is rank 0 and leads, ranks 1..N-1 follow.

The scheduler runs once, in the engine; `LeaderDecoder` stands in for the Decoder there and, before
each call that runs collectives (allocate the KV cache, forward, logits), broadcasts the call and its
small inputs (token ids, positions, the paged batch, the logit rows) to the followers, which replay
it on their shard (models/tensor_parallel.py). Followers are plain subprocesses
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
from fusionserve.kernels.fp8 import Fp8Weight
from fusionserve.models.decoder import Decoder, Hidden, geometry, resolve_device, resolve_dtype
from fusionserve.models.loader import ModelWeights, load_weights
from fusionserve.models.tensor_parallel import TensorParallel, shard

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
    backend = select_backend(device, geometry(local_cfg), spec.backend)
    return Decoder(local_cfg, _to_device(local, device), backend, spec.max_model_len, tp=tp)


def _send(call: tuple) -> None:
    dist.broadcast_object_list([call], src=0)


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
        _send(("alloc", num_blocks, block_size))
        return self.decoder.allocate_kv_cache(num_blocks, block_size)

    def forward(self, ids, positions, batch, kv, fusion: bool = True, timer=None) -> _RowsHidden:
        _send(("forward", ids.cpu(), positions.cpu(), batch.to("cpu"), fusion))
        hidden = self.decoder.forward(ids, positions, batch, kv, fusion, timer)
        return _RowsHidden(hidden.h, hidden.stats)

    def logits(self, hidden: Hidden, scaled: bool = True) -> torch.Tensor:
        index = getattr(hidden, "index", None)
        _send(("logits", index.cpu() if index is not None else None, scaled))
        return self.decoder.logits(hidden, scaled)

    def shutdown(self) -> None:
        self._stopping = True
        _send(("stop",))
        for proc in self.followers:
            proc.wait(timeout=30)


def follow(spec: GroupSpec, rank: int) -> None:
    """A follower's life: build the shard, then replay the leader's calls until told to stop."""
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    decoder = build_rank(spec, rank)
    kv = hidden = None
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        op, *args = box[0]
        if op == "stop":
            break
        if op == "alloc":
            kv = decoder.allocate_kv_cache(*args)
        elif op == "forward":
            ids, positions, batch, fusion = args
            dev = decoder.device
            hidden = decoder.forward(ids.to(dev), positions.to(dev), batch.to(dev), kv, fusion)
        elif op == "logits":
            index, scaled = args
            decoder.logits(hidden.rows(index.to(decoder.device)) if index is not None else hidden, scaled)
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
