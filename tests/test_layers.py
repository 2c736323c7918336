"""The folders import one way (docs/design.md §2): library ← experiments ← eval ← tests, and the library imports no
Hydra, OmegaConf or W&B. Read from the source files' import statements (module level and inside functions)."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from msd.paths import REPO_ROOT

LIBRARY = ("msd", "baselines", "toy2d", "shapes")
LAYERS = {**dict.fromkeys(LIBRARY, 0), "experiments": 1, "eval": 2, "tests": 3}
RUN_FRAMEWORKS = ("hydra", "omegaconf", "wandb", "wandb_workspaces", "submitit")


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def folder_imports() -> dict[tuple[str, str], list[str]]:
    """(importing folder, imported folder) → the files that make the import."""
    edges = defaultdict(list)
    for folder in LAYERS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for module in imported_modules(path):
                top = module.split(".")[0]
                if top in LAYERS and top != folder:
                    edges[folder, top].append(str(path.relative_to(REPO_ROOT)))
    return edges


def test_no_two_folders_import_each_other_and_imports_point_down():
    edges = folder_imports()
    assert edges, "no imports found: the scan is broken"
    mutual = sorted({tuple(sorted(pair)) for pair in edges if pair[::-1] in edges})
    assert not mutual, f"folders importing each other: {mutual}"
    upward = {pair: files for pair, files in edges.items() if LAYERS[pair[1]] > LAYERS[pair[0]]}
    assert not upward, f"imports from a higher layer: {upward}"


def test_library_imports_no_run_framework():
    offending = {str(path.relative_to(REPO_ROOT)): sorted(m for m in imported_modules(path)
                                                          if m.split(".")[0] in RUN_FRAMEWORKS)
                 for folder in LIBRARY for path in (REPO_ROOT / folder).rglob("*.py")}
    assert not {path: modules for path, modules in offending.items() if modules}
