"""One exception type for every way a checkpoint can be unusable, so callers catch one thing."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A model folder or checkpoint we cannot load; the message names the file (and tensor) at fault."""

    def __init__(self, message: str, file: str | Path | None = None, tensor: str | None = None):
        where = []
        if file is not None:
            where.append(f"file {str(file)!r}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{message}" + (f" ({', '.join(where)})" if where else ""))
        self.file = str(file) if file is not None else None
        self.tensor = tensor
