"""Chapter order is import order.

A module may import only modules taught in earlier chapters (the order of settings.ini [chapters]); a later chapter
plugs into an earlier one through a seam instead. Tools (notebooks 90 and up) come after every chapter, in the same
order among themselves (the command line last), and no chapter imports a tool. Imports inside functions count, and so do code strings run as programs
(`python -c "from openllm_edu.cli import main"`, `-m openllm_edu.cli`, `importlib.import_module("openllm_edu.x")`).
There are no exceptions and no cycles.
"""
import ast
import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "openllm_edu"
FIRST_TOOL = 90  # notebooks numbered from here on are tools for instructors and users, not course chapters
CELL_SOURCE = re.compile(r"^# %% \.\./nbs/(?P<stem>[\w-]+)\.ipynb", re.MULTILINE)
IN_CODE_STRING = re.compile(rf"(?:\bfrom\s+|\bimport\s+|-m\s+){PACKAGE}\.(\w+)")
IMPORT_CALLS = ("import_module", "__import__")


def chapter_order(settings: Path) -> dict[str, int]:
    parser = configparser.ConfigParser()
    parser.optionxform = str  # stems are case-sensitive file names
    parser.read(settings, encoding="utf-8")
    return {stem: index for index, stem in enumerate(parser["chapters"])}


def module_notebooks(package: Path) -> dict[str, str]:
    "Module name -> the notebook it is exported from (nbdev writes `# %% ../nbs/STEM.ipynb` above every cell)."
    owners = {}
    for path in sorted(package.glob("*.py")):
        stems = set(CELL_SOURCE.findall(path.read_text(encoding="utf-8")))
        assert len(stems) <= 1, f"{path.name} is exported from several notebooks {sorted(stems)}; give each its own module"
        if stems:
            owners[path.stem] = stems.pop()
    return owners


def _from_target(node: ast.ImportFrom, module: str) -> list[str]:
    if node.level == 1:  # from .x import y  /  from . import x
        return [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
    if node.level == 0 and node.module and node.module.split(".")[0] == PACKAGE:
        parts = node.module.split(".")
        return [parts[1]] if len(parts) > 1 else [alias.name for alias in node.names]
    return []


def imported_modules(source: str, module: str) -> set[str]:
    "Every package module `source` imports: at top level, inside functions, and in code strings."
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names
                      if alias.name.startswith(PACKAGE + ".")}
        elif isinstance(node, ast.ImportFrom):
            found |= set(_from_target(node, module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in IMPORT_CALLS:
            names = [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            found |= {name.split(".")[1] for name in names if name.startswith(PACKAGE + ".")}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found |= set(IN_CODE_STRING.findall(node.value))
    return found - {module, "_modidx"}


def import_graph(package: Path) -> dict[str, set[str]]:
    return {path.stem: imported_modules(path.read_text(encoding="utf-8"), path.stem)
            for path in sorted(package.glob("*.py")) if path.stem not in ("__init__", "_modidx")}


def is_tool(stem: str) -> bool:
    return int(re.match(r"\d+", stem).group()) >= FIRST_TOOL


def order_violations(graph: dict[str, set[str]], owners: dict[str, str], order: dict[str, int]) -> list[str]:
    problems = []
    for module, imports in sorted(graph.items()):
        stem = owners[module]
        for target in sorted(imports):
            if target not in owners:
                problems.append(f"{module} imports {target}, which no notebook exports")
            elif is_tool(owners[target]) and not is_tool(stem):
                problems.append(f"{module} ({stem}) imports the tool {target} ({owners[target]})")
            elif order[owners[target]] >= order[stem]:
                problems.append(f"{module} ({stem}) imports {target} ({owners[target]}), taught later or alongside")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    "Every import cycle, each reported once from its smallest name (depth-first search)."
    found = []

    def visit(path: list[str]) -> None:
        for target in sorted(graph.get(path[-1], ())):
            if target == path[0]:
                found.append(path + [target])
            elif target > path[0] and target not in path:
                visit(path + [target])

    for start in sorted(graph):
        visit([start])
    return found


def test_every_exporting_notebook_is_a_listed_chapter():
    order = chapter_order(ROOT / "settings.ini")
    missing = sorted(set(module_notebooks(ROOT / PACKAGE).values()) - set(order))
    assert not missing, f"add these notebooks to settings.ini [chapters]: {missing}"


def test_modules_import_only_earlier_chapters():
    order = chapter_order(ROOT / "settings.ini")
    owners = module_notebooks(ROOT / PACKAGE)
    problems = order_violations(import_graph(ROOT / PACKAGE), owners, order)
    assert not problems, "imports against the chapter order:\n" + "\n".join(problems)


def test_no_import_cycles():
    found = cycles(import_graph(ROOT / PACKAGE))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("module, later", [("trainer", {"distributed", "memory"}), ("data", {"tokenizer"})])
def test_an_early_chapter_loads_without_later_ones(module, later):
    code = (f"import sys, {PACKAGE}.{module}; "
            f"print(sorted(m.split('.')[1] for m in sys.modules if m.startswith('{PACKAGE}.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(eval(done.stdout))
    assert module in loaded and not loaded & later, f"importing {module} loaded {sorted(loaded & later)}"


def test_the_checks_can_fail(tmp_path):
    "Forward imports hidden in a function, in a code string and between tools, a chapter importing a tool, a cycle."
    package = tmp_path / PACKAGE
    package.mkdir()
    modules = {
        "core": ("00_setup", "def late():\n    from .model import GPT\n"),
        "model": ("05_gpt", "CODE = 'import sys; from openllm_edu.cli import main'\nfrom . import core\n"),
        "bench": ("96_benchmarks", "def run():\n    import openllm_edu.cli\n"),
        "cli": ("98_cli", "import importlib\nimportlib.import_module('openllm_edu.model')\nKIND = 'openllm_edu.gpt'\n"),
    }
    for name, (stem, body) in modules.items():
        (package / f"{name}.py").write_text(f"# %% ../nbs/{stem}.ipynb 1\n{body}")
    order = {"00_setup": 0, "05_gpt": 1, "96_benchmarks": 2, "98_cli": 3}
    graph = import_graph(package)
    assert graph == {"core": {"model"}, "model": {"cli", "core"}, "bench": {"cli"}, "cli": {"model"}}
    assert order_violations(graph, module_notebooks(package), order) == [
        "bench (96_benchmarks) imports cli (98_cli), taught later or alongside",
        "core (00_setup) imports model (05_gpt), taught later or alongside",
        "model (05_gpt) imports the tool cli (98_cli)"]
    assert cycles(graph) == [["cli", "model", "cli"], ["core", "model", "core"]]
