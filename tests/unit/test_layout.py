"""The layout's one rule (../shared/DESIGN.md): library modules never import a recipe or a
command, not even inside a function. Recipes import the library; commands import recipes
and the library; the entry points (cli.py, finetuning.py, dpo.py) import commands."""
import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "shardtune"
ENTRY_POINTS = {"shardtune.cli", "shardtune.finetuning", "shardtune.dpo"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every shardtune module a file imports, at any depth, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m.startswith("shardtune")}


def layer(module: str) -> str:
    if module in ENTRY_POINTS:
        return "entry"
    for top in ("recipes", "commands"):
        if module == f"shardtune.{top}" or module.startswith(f"shardtune.{top}."):
            return top
    return "library"


def test_library_never_imports_a_recipe_or_a_command():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for target in imports(path):
            allowed = {"library": {"library"}, "recipes": {"library", "recipes"},
                       "commands": {"library", "recipes", "commands"}, "entry": {"library", "commands"}}[layer(source)]
            if layer(target) not in allowed:
                wrong.append(f"{source} -> {target}")
    assert not wrong, wrong
    assert imports(PACKAGE / "commands" / "plan.py") & {"shardtune.config.validate"}  # the walk sees imports in functions


def test_benchmark_drivers_import_shared_helpers_not_each_other():
    """bench.py is the driver: the other benchmark modules take what they share from
    harness.py, so no module imports the driver back (the cycle the layout removed)."""
    bench = REPO / "benchmarks"
    back = [path.name for path in bench.glob("*.py") if path.name != "bench.py"
            and any(isinstance(node, ast.ImportFrom) and node.module in ("bench", "benchmarks.bench")
                    for node in ast.walk(ast.parse(path.read_text())))]
    assert not back, back
