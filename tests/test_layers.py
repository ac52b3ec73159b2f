"""The package's layers, read from the source: the core's files import only files below them (the
order README.md's "What is where" lists), the core never imports Prefect, tasks or flows, and tasks
never import flows. A new import that points up a layer fails here with the file and the line."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ptycho_core from the bottom up; io/ and stages/ are one layer each
CORE_LAYERS = ("faults", "config", "physics", "forward", "model", "losses", "constraints", "quality",
               "checkpoint", "io", "collective", "measurements", "scan_calibration", "scan_fit", "arrivals", "engine", "devices", "resample",
               "reconstruction", "rundir", "runlock", "ranks", "simulate", "stages", "inspect")


def _imports(path: Path, package: str):
    """(line, absolute module) for every import in ``path``, whose own package is ``package``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # `from . import x` names a module
                yield node.lineno, f"{module}.{alias.name}"


def _layer(module: str):
    parts = module.split(".")
    if parts[0] != "ptycho_core" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in CORE_LAYERS else None


def _files(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        parts = list(relative.parts)
        package = ".".join(parts[:-1] if parts[-1] != "__init__" else parts[:-1])
        yield path, ".".join(parts), package


def test_every_core_file_belongs_to_a_layer():
    files = {_layer(module) for _, module, _ in _files("ptycho_core") if not module.endswith("__init__")}
    assert None not in files and files == set(CORE_LAYERS)


def test_core_imports_point_down_the_layers_only():
    upward = []
    for path, module, package in _files("ptycho_core"):
        own = _layer(module)
        if own is None:  # the package's __init__ re-exports
            continue
        for line, target in _imports(path, package):
            theirs = _layer(target)
            if theirs is not None and CORE_LAYERS.index(theirs) > CORE_LAYERS.index(own):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({theirs} is above {own})")
    assert not upward, "\n".join(upward)


def test_the_core_never_imports_the_orchestration_and_tasks_never_import_flows():
    wrong = []
    for folder, forbidden in (("ptycho_core", ("prefect", "tasks", "flows")), ("tasks", ("flows",))):
        for path, _, package in _files(folder):
            for line, target in _imports(path, package):
                if target.split(".")[0] in forbidden:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_readme_lists_the_core_in_its_layer_order():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("ptycho_core/      the torch core"):readme.index("tasks/            Prefect tasks")]
    listed = tuple(m.group(1) for m in map(re.compile(r"  (\w+)(?:\.py|/)\s").match, block.splitlines()) if m)
    assert listed == CORE_LAYERS
