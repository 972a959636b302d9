"""The generated parts of the repository must match their sources.

- openllm_edu/*.py is generated from nbs/*.ipynb by nbdev-export, and notebooks are stored cleaned
  (nbdev-clean). We export and clean a copy of the project and compare it with the working tree.
- exercises/ is generated from solutions/ by `openllm-edu instructor release`.
"""
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _changed_files(original: Path, regenerated: Path, pattern: str) -> list[str]:
    names = {p.name for p in original.glob(pattern)} | {p.name for p in regenerated.glob(pattern)}
    return sorted(n for n in names if not ((original / n).exists() and (regenerated / n).exists()
                                            and filecmp.cmp(original / n, regenerated / n, shallow=False)))


def test_library_and_notebooks_are_in_sync(tmp_path):
    for name in ("pyproject.toml", "settings.ini"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "nbs", tmp_path / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(ROOT / "openllm_edu", tmp_path / "openllm_edu", ignore=shutil.ignore_patterns("__pycache__"))
    for command in ("nbdev-export", "nbdev-clean"):
        done = subprocess.run([str(BIN / command)], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"

    library = _changed_files(ROOT / "openllm_edu", tmp_path / "openllm_edu", "*.py")
    assert not library, (f"openllm_edu/ is out of sync with nbs/ for {library}: edit the notebook, "
                         "run nbdev-export and commit both")
    notebooks = _changed_files(ROOT / "nbs", tmp_path / "nbs", "*.ipynb")
    assert not notebooks, f"notebooks not cleaned: {notebooks}; run nbdev-clean and commit"


def test_sync_check_can_fail(tmp_path):
    "The comparison above must notice a hand edit of a generated file."
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "core.py").write_text("x = 1\n")
    (tmp_path / "b" / "core.py").write_text("x = 2\n")
    (tmp_path / "b" / "extra.py").write_text("")
    assert _changed_files(tmp_path / "a", tmp_path / "b", "*.py") == ["core.py", "extra.py"]


def test_exercises_are_generated_from_solutions():
    from openllm_edu.exercises import release_differences

    differences = release_differences(ROOT / "solutions", ROOT / "exercises")
    assert not differences, ("exercises/ is out of sync with solutions/: run `openllm-edu instructor release` "
                             "and commit exercises/:\n" + "\n".join(differences))
