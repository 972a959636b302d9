"""Lint and import order, checked by the test command itself: ruff with the rules in pyproject.toml.

The library is generated from the notebooks, so a finding in openllm_edu/ is fixed in nbs/ and re-exported."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           "--config", str(ROOT / "pyproject.toml"), *args], cwd=cwd, capture_output=True, text=True)


def test_the_library_and_tests_are_clean():
    done = ruff("openllm_edu", "tests")
    assert done.returncode == 0, f"ruff found problems (fix them in nbs/ for openllm_edu/):\n{done.stdout}{done.stderr}"


def test_the_rules_catch_an_unused_import_and_unsorted_imports(tmp_path):
    (tmp_path / "bad.py").write_text("import sys\nimport os\n\nprint(os.sep)\n")
    done = ruff("bad.py", cwd=tmp_path)
    assert done.returncode == 1 and "F401" in done.stdout and "I001" in done.stdout, done.stdout + done.stderr
