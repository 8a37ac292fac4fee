"""The package's layering, checked from the source so it cannot rot (docs/architecture.md).

Layers, lowest first: the core modules at the top of the package, control/ (the protocol),
run/ (the local worker group), observe/ (what the user reads), then the assemblers
(launcher, manual, cli). A module imports only from its own layer or lower ones, every
import counted, those inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ddp_launch"
ASSEMBLERS = {"ddp_launch.launcher", "ddp_launch.manual", "ddp_launch.cli", "ddp_launch.__main__"}
LAYERS = {"control": 1, "run": 2, "observe": 3}
# The run's state and the values every layer shares: no gRPC, no torch, no I/O of a server.
PURE = ("ddp_launch.registry", "ddp_launch.record", "ddp_launch.config", "ddp_launch.env", "ddp_launch.progress")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "proto" not in p.parts}


def imports(path: Path, package: str | None = None) -> set[str]:
    """Every module `path` imports, anywhere in it; `from pkg import mod` counts as pkg.mod."""
    found: set[str] = set()
    if package is None:
        package = module_name(path).rpartition(".")[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def layer(name: str) -> int:
    if name in ASSEMBLERS:
        return 4
    parts = name.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS):
        return LAYERS.get(parts[1], 0)
    return 0


def ours(names: set[str], known: dict[str, Path]) -> set[str]:
    return {n for n in names if n in known}


def test_every_import_points_down_or_sideways() -> None:
    known = modules()
    wrong = []
    for name, path in sorted(known.items()):
        for target in sorted(ours(imports(path), known)):
            if layer(target) > layer(name):
                wrong.append(f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_assemblers() -> None:
    known = modules()
    offenders = [
        f"{name} imports {target}"
        for name, path in known.items()
        if name not in ASSEMBLERS or name == "ddp_launch.__main__"
        for target in ours(imports(path), known) & ASSEMBLERS
        if not (name == "ddp_launch.__main__" and target == "ddp_launch.cli")
    ]
    # cli assembles launcher and manual; nothing below them may reach up to them.
    offenders += [
        f"{name} imports {target}"
        for name, path in known.items()
        if name in ("ddp_launch.launcher", "ddp_launch.manual")
        for target in ours(imports(path), known) & {"ddp_launch.cli"}
    ]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("name", PURE)
def test_the_core_state_imports_neither_grpc_nor_torch(name: str) -> None:
    path = modules()[name]
    heavy = {n for n in imports(path) if n.split(".")[0] in ("grpc", "torch")}
    assert not heavy, f"{name} imports {sorted(heavy)}"


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    # The checker itself must be able to fail: an observe module imported by a run module.
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from ..observe import view\n    import grpc\n")
    found = imports(path, package="ddp_launch.run")
    assert "ddp_launch.observe.view" in found and "grpc" in found
    assert layer("ddp_launch.run.supervisor") < layer("ddp_launch.observe.view")
    assert layer("ddp_launch.registry") < layer("ddp_launch.control.wire") < layer("ddp_launch.launcher")
