"""The shape the code keeps (docs/DESIGN.md, "Layout"): one installed namespace, a torch-free HTTP
side, and size limits on the product's rooms (server/, models/, kernels/)."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("server", "models", "kernels")
#: nano-vllm-sized: 1,741 after the architecture split; + supervision, priority scheduling (#19),
#: structured output (#20: server/engine/structured.py).
ENGINE_CODE_LINES = 2300
FILE_LINES = 500
FUNCTION_LINES = 80


def product_files() -> list[Path]:
    return sorted(p for room in ROOMS for p in (ROOT / room).rglob("*.py"))


def code_lines(path: Path) -> int:
    """Lines holding code, as cloc counts them: blank, comment and docstring lines excluded."""
    src = path.read_text()
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(src)):
        body = getattr(node, "body", None)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body:
            first = body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    skip = {
        tokenize.COMMENT,
        tokenize.NL,
        tokenize.NEWLINE,
        tokenize.INDENT,
        tokenize.DEDENT,
        tokenize.ENDMARKER,
    }
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in skip:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docstrings)
    return len(lines)


def test_engine_room_size():
    total = sum(code_lines(p) for p in (ROOT / "server" / "engine").glob("*.py"))
    assert total <= ENGINE_CODE_LINES, (
        f"server/engine holds {total} lines of code (limit {ENGINE_CODE_LINES})"
    )


def test_no_product_file_or_function_too_long():
    too_long = []
    for path in product_files():
        text = path.read_text()
        if text.count("\n") > FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                jit = any("jit" in ast.unparse(d) for d in node.decorator_list)  # Triton kernel bodies
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_LINES and not jit:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)


def test_http_side_imports_no_torch():
    """The HTTP process never computes: its modules, the process client and the model resolution
    (a GGUF is converted in a child process) leave torch unimported."""
    code = (
        "import sys\n"
        "import fusionserve.server.api.serve, fusionserve.server.api.app, fusionserve.server.api.cli\n"
        "import fusionserve.server.engine.process_client, fusionserve.models.registry\n"
        "from fusionserve.models.tokenizer import load_tokenizer\n"
        "bad = sorted(m for m in ('torch', 'triton', 'numpy') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_namespace_links_point_at_the_rooms():
    import fusionserve

    assert fusionserve.__version__
    for room in ROOMS:
        link = ROOT / "fusionserve" / room
        assert link.is_symlink() and link.resolve() == (ROOT / room).resolve(), room


@pytest.mark.slow
def test_wheel_installs_only_the_fusionserve_namespace(tmp_path):
    """`pip install .` puts nothing but fusionserve at the top of site-packages (PyPI has packages
    called `kernels` and `models`), and the console script stays `fusionserve`."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("fusionserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.startswith("fusionserve")} == set(), tops
    for module in (
        "fusionserve/server/engine/core.py",
        "fusionserve/server/api/app.py",
        "fusionserve/kernels/norm_linear.py",
    ):
        assert module in names, module
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "fusionserve = fusionserve.server.api.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    )
