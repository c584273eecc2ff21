"""The console entry point as users run it: `generate` and `convert` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env_home: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if env_home is not None:
        env["FUSIONSERVE_HOME"] = str(env_home)
    return subprocess.run(
        [sys.executable, "-m", "fusionserve.server.api.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )


def test_generate_chat_with_the_default_model(default_model_dir):
    home = default_model_dir.parents[1]  # $FUSIONSERVE_HOME/models/<name>
    for fusion in ("on", "off"):
        run = cli(
            "generate",
            "--prompt",
            "What is the capital of France?",
            "--chat",
            "--max-tokens",
            "16",
            "--fusion",
            fusion,
            env_home=home,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert "Paris" in run.stdout
        assert "tokens/s" in run.stderr and f"fusion {fusion}" in run.stderr


def test_generate_rejects_bad_arguments(default_model_dir):
    run = cli("generate", "--prompt", "hi", "--max-tokens", "0", env_home=default_model_dir.parents[1])
    assert run.returncode == 2 and "max-tokens" in run.stderr


def test_convert_gguf_and_errors(default_gguf_path, tmp_path):
    out = tmp_path / "converted"
    run = cli("convert", str(default_gguf_path), str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 30
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"definitely not a gguf file")
    run = cli("convert", str(bad), str(tmp_path / "never"))
    assert run.returncode == 2 and "not.gguf" in run.stderr
    assert not (tmp_path / "never").exists()


def test_serve_allowed_origins_flag_and_environment(monkeypatch):
    import argparse

    import pytest

    from fusionserve.server.api.serve import add_serve_args

    def parse(*argv: str) -> argparse.Namespace:
        p = argparse.ArgumentParser(exit_on_error=False)
        add_serve_args(p)
        return p.parse_args(list(argv))

    assert parse().allowed_origins == ()
    got = parse("--allowed-origins", "https://a.example/, http://localhost:3000").allowed_origins
    assert got == ("https://a.example", "http://localhost:3000")
    monkeypatch.setenv("FUSIONSERVE_ALLOWED_ORIGINS", "*")
    assert parse().allowed_origins == ("*",)
    with pytest.raises(argparse.ArgumentError):
        parse("--allowed-origins", "not-an-origin")


def test_serve_refuses_a_model_without_a_tokenizer(tmp_path):
    """A folder of weights alone: a clear message and exit status 2, not a traceback at start-up."""
    from tests.tiny_models import make_tiny_neox

    run = cli("serve", "--model", str(make_tiny_neox(tmp_path / "m")), "--port", "1")
    assert run.returncode == 2 and "no tokenizer.json" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
