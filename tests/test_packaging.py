"""Packaging: a wheel carries the course settings, installs anywhere, and the extras are consistent."""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    # Build from a copy, so setuptools' build/ folder never lands in the checkout.
    for name in ("pyproject.toml", "README.md", "LICENSE", "settings.ini"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "openllm_edu", source / "openllm_edu", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    # No build isolation: the build uses this environment's setuptools and never reaches a package index.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True, capture_output=True, cwd=out)
    (built,) = out.glob("openllm_edu-*.whl")
    return built


def test_the_wheel_carries_the_course_settings(wheel):
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("openllm_edu/settings.ini") == (ROOT / "settings.ini").read_bytes()
        assert not [n for n in archive.namelist() if n.startswith(("nbs/", "tests/", "solutions/"))]


def test_an_installed_wheel_finds_its_settings_away_from_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", str(site), str(wheel)], check=True, capture_output=True)
    code = ("import openllm_edu.core as core; print(core.__file__); print(core.find_settings_file()); "
            "print(list(core.load_settings().chapters)[0])")
    env = {k: v for k, v in os.environ.items() if k != "OPENLLM_EDU_SETTINGS"} | {"PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    module, settings, first = done.stdout.split()
    assert Path(module).is_relative_to(site), "the test must import the installed copy, not the checkout"
    assert Path(settings) == site / "openllm_edu" / "settings.ini" and first == "00_setup"


def test_dev_installs_every_extra():
    "The installed metadata: `pip install -e '.[dev]'` pulls in every other extra."
    extras = set(importlib.metadata.metadata("openllm-edu").get_all("Provides-Extra")) - {"dev"}
    dev = [r for r in importlib.metadata.requires("openllm-edu") if 'extra == "dev"' in r]
    included = [r.split("[")[1].split("]")[0] for r in dev if r.startswith("openllm-edu[")]
    assert extras and {extra for names in included for extra in names.split(",")} == extras


def test_the_notebook_kernel_has_the_course_and_takes_the_profile_from_a_cell():
    "README 'Open the course': the environment's own kernel imports openllm_edu, and `%env` in a cell sets the profile."
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3", env={**os.environ, "OPENLLM_EDU_PROFILE": "laptop"})
    try:
        outputs = []
        code = ("%env OPENLLM_EDU_PROFILE=ci\n"
                "import openllm_edu.core as core\nprint(core.__file__, core.get_profile().name)")
        client.execute_interactive(code, timeout=60, output_hook=lambda msg: outputs.append(msg))
        printed = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    module, profile = printed.split()[-2:]
    assert Path(module).resolve() == (ROOT / "openllm_edu" / "core.py").resolve() and profile == "ci", printed
