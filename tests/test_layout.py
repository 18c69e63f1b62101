"""The package's shape: data flows one way, command modules lend nothing, light modules stay light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"cnx.train", "cnx.generate", "cnx.validate", "cnx.export", "cnx.launch"}


def imported_modules(path: Path) -> set[str]:
    """Every `cnx...` module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from cnx import train`
    return {name for name in found if name.split(".")[0] == "cnx"}


@pytest.mark.parametrize("path", sorted((ROOT / "cnx").glob("*.py")), ids=lambda p: p.name)
def test_no_module_of_cnx_imports_a_command_module(path):
    """`train`, `generate`, `validate`, `export`, `launch` are commands: what they hold, no one borrows."""
    module = f"cnx.{path.stem}"
    assert not (imported_modules(path) & COMMANDS) - {module}


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_no_benchmark_imports_the_trainer(path):
    """Benchmarks time the step (`cnx.step`), never the trainer's module; they may run it as a process."""
    assert "cnx.train" not in imported_modules(path)


def test_the_command_table_names_every_command_module():
    from cnx.cli import COMMANDS as TABLE

    assert COMMANDS <= {module for module, _ in TABLE.values()}


def test_run_layout_flags_and_options_import_no_torch():
    """A typo in a flag or a wrong checkpoint path costs a second, not a torch import."""
    code = "import sys, cnx.runs, cnx.flags, cnx.options; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
