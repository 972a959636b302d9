"""Attacks on the grader (openllm_edu.autograde and the modules below it), and what must happen to each.

Every attack is a jupytext percent fixture in tests/fixtures/grading/attacks/ that holds only the attack: its
cells and the graded functions it breaks or cheats on. `submission` makes the graded file from it: the solution
notebook's setup imports cell, then the fixture's cells, then the notebook's solution cells (less their
`### BEGIN/END SOLUTION` lines) for every graded function the fixture does not bind at its top level (by def,
import or assignment), so the items it does not attack are answered correctly. A cell holding only
`# (honest solutions here)` or `# (honest solutions here: NAME, ...)` puts those solution cells there instead of
at the end; a line `# (left out on purpose: NAME, ...)` leaves those functions missing. `*_99_toy.py` files are
graded against the toy assignment (tests/fixtures/grading/solutions, running_sum 1, softmax 2, histogram 2,
under the small limits of tests/fixtures/grading/settings.ini); `*_03_lm_basics.py` files against the course's
solutions/03_lm_basics.ipynb, whose hidden tests compare with references in openllm_edu.metrics. `@@NAME@@` in
a fixture is filled in by its test (a path of this run).

 1. The reference imported (as the graded name, through an aliased module, with importlib.import_module,
    through a helper) -> that item 0, feedback "0 points: ..." naming the reference or the route; others full.
    exec() of the library's source file -> every item 0 naming `__file__` (the code it brings could serve any
    item).
 2. The reference looked up at run time (its name built from pieces, so no static check can see it) and called
    from the graded function, also on another thread -> that item 0, "called the reference"; others full.
    A module imported at the top level by a computed name, or the run-time watch switched off
    (sys.setprofile) -> every item 0, naming the route.
 3. Fake results on stdout, on fds 1, 2 and 3..10, well-formed protocol frames on the worker's pipes, the
    grading helpers and json.dumps patched in the submission, an atexit hook -> right items full, the wrong and
    the missing ones 0, a report.
 4. A graded function walks the stack, inspect.stack() and gc.get_objects() for the hidden test -> finds
    nothing (another process), answers wrongly, 0; none of the hidden test's text reaches the report.
 5. Reading the solutions, the settings, /proc/1 and the parent's cwd/root/environ, listing folders -> every
    read fails, no solution text or grader secret in the output; honest items full.
 6. Overwriting and deleting a file of the grader's machine, appending to the installed openllm_edu/core.py
    (found at run time, and through openllm_edu.core.__file__), planting a .pth in site-packages -> all files
    byte-identical, no .pth; honest items full where no static rule applies. Skipped where nothing isolates.
 7. setsid/fork+setsid children and a double-forked daemon that write a file 3 s later -> after grading and
    5 s more, no file and no process carrying the marker.
 8. A fork bomb -> capped (pids limit), grading ends within its time limit, honest items full.
 9. 20 GiB of address space reserved but untouched -> no error; 3 GiB really written under 2048 MB -> that
    cell's error says memory, the other items full.
10. An honest and a destructive submission graded at once (processes; threads) -> the honest one gets full
    marks, the solution notebook is unchanged.
11. A graded function returning a lambda, a torch module, an open file -> that item 0 with a clear message.
12. Correct but unusual files (BOM in .ipynb and .py, CRLF, odd cell metadata, no imports cell, magics,
    a `%` continuation line, metadata naming another assignment) -> full marks (the last with a flag).
13. Same file and secret -> same seed and items; another file name -> another seed; --secret-file changes it.
14. grade_folder on a class (solution, exercise, half-done, cheat, broken file, BOM) -> the expected
    gradebook; a regrade after deleting a file keeps its row; --jobs 2 gives the same gradebook; the CLI
    form works and a missing --out is one line, exit 2.
15. ANSI escapes and a 1 MB exception message -> no raw ESC in str(report), feedback at most ~2100 characters.
"""
import ast
import base64
import csv
import dataclasses
import io
import json
import multiprocessing
import os
import re
import shutil
import site
import subprocess
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

from openllm_edu import exercises, sandbox
from openllm_edu.autograde import GradeReport, grade, grade_folder, report_markdown
from openllm_edu.core import load_settings
from openllm_edu.submission import grading_seed

FIXTURE = Path(__file__).parent / "fixtures" / "grading"
ATTACKS = FIXTURE / "attacks"
TOY_SOLUTIONS = FIXTURE / "solutions"
REPO = Path(__file__).resolve().parents[1]
SOLUTION_NOTEBOOKS = {"99_toy": TOY_SOLUTIONS / "99_toy.ipynb",
                      "03_lm_basics": REPO / "solutions" / "03_lm_basics.ipynb"}
HONEST_HERE = re.compile(r"# \(honest solutions here(?:: (?P<names>[\w, ]+))?\)")
LEFT_OUT = re.compile(r"^# \(left out on purpose: (?P<names>[\w, ]+)\)$", re.MULTILINE)
SECRET = "attack-tests"
FULL = {"running_sum": 1, "softmax": 2, "histogram": 2}
RIGHT_WRONG_MISSING = {"running_sum": 1, "softmax": 0, "histogram": 0}
COURSE_FULL = {"bigram_counts": 2, "cross_entropy": 3, "bits_per_byte": 2, "sample_next": 2, "smoothing_sweep": 3}
CLI = str(Path(sys.executable).parent / "openllm-edu")


@pytest.fixture(scope="module")
def toy_settings():
    return load_settings(FIXTURE / "settings.ini")


@pytest.fixture(scope="module")
def course_settings():
    return load_settings(REPO / "settings.ini")


@pytest.fixture(scope="module")
def solution():
    return nbformat.read(TOY_SOLUTIONS / "99_toy.ipynb", as_version=4)


def honest_cells(notebook: Path) -> tuple[str, dict[str, str]]:
    "A solution notebook's setup imports cell (its first locked code cell) and its solution cells, by function."
    cells = nbformat.read(notebook, as_version=4).cells
    setup = next(c.source for c in cells if c.cell_type == "code" and exercises.nbgrader_of(c).get("locked")
                 and not exercises.nbgrader_of(c).get("grade") and not exercises.nbgrader_of(c).get("solution"))
    solved = {}
    for cell in cells:
        if cell.cell_type == "code" and exercises.nbgrader_of(cell).get("grade_id", "").endswith("_code"):
            source = "\n".join(line for line in cell.source.split("\n")
                               if line.strip() not in (exercises.SOLUTION_BEGIN, exercises.SOLUTION_END))
            [function] = [node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]
            solved[function] = source
    return setup, solved


def top_level_names(source: str) -> set[str]:
    "The names a script binds at its top level (defs, classes, imports under their aliases, assignments, loops)."
    names, pending = set(), list(ast.parse(source).body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif not isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            pending.extend(ast.iter_child_nodes(node))  # into if/try/with/for bodies, not into other scopes
    return names


def percent_cells(text: str) -> list[str]:
    "A jupytext percent script cut into its cells, each from its `# %%` line, trailing blank lines dropped."
    cells = []
    for line in text.split("\n"):
        if line.startswith("# %%") or not cells:
            cells.append([])
        cells[-1].append(line)
    return ["\n".join(lines).rstrip("\n") for lines in cells if "".join(lines).strip()]


def _names(listed: str | None) -> list[str]:
    return [name.strip() for name in (listed or "").split(",") if name.strip()]


def submission_text(fixture: str, **fill: str) -> str:
    """An attack fixture, its `@@KEY@@` placeholders filled in, made a whole submission: the solution notebook's
    setup imports cell, the fixture's cells, and the honest solution cells of the graded functions it does not
    define (where a `# (honest solutions here...)` cell stands, the rest at the end)."""
    text = (ATTACKS / fixture).read_text(encoding="utf-8")
    for key, value in fill.items():
        text = text.replace(f"@@{key}@@", value)
    assert "@@" not in text, f"{fixture}: a placeholder was left unfilled"
    [assignment] = [a for a in SOLUTION_NOTEBOOKS if Path(fixture).stem.endswith(a)]
    setup, solved = honest_cells(SOLUTION_NOTEBOOKS[assignment])
    left_out = {name for found in LEFT_OUT.finditer(text) for name in _names(found["names"])}
    assert left_out <= solved.keys(), f"{fixture}: leaves out {left_out - solved.keys()}, not graded functions"
    wanted = [name for name in solved if name not in top_level_names(text) | left_out]
    fixture_cells = percent_cells(text)
    markers = [HONEST_HERE.fullmatch(cell.partition("\n")[2].strip()) if cell.startswith("# %%\n") else None
               for cell in fixture_cells]
    named = [name for marker in markers if marker for name in _names(marker["names"])]
    assert len(named) == len(set(named)) and set(named) <= set(wanted), \
        f"{fixture}: honest solutions placed twice, or for a function it defines or leaves out: {named}"
    rest = [name for name in wanted if name not in named]
    cells = [f"# %%\n{setup}"]
    for cell, marker in zip(fixture_cells, markers):
        if marker is None:
            cells.append(cell)
        elif marker["names"]:
            cells += [f"# %%\n{solved[name]}" for name in _names(marker["names"])]
        else:
            cells += [f"# %%\n{solved[name]}" for name in rest]
            rest = []
    cells += [f"# %%\n{solved[name]}" for name in rest]
    return "\n\n".join(cells) + "\n"


def submission(folder: Path, fixture: str, name: str | None = None, **fill: str) -> Path:
    "The submission made from an attack fixture (see `submission_text`), as `folder / name`."
    path = folder / (name or fixture)
    path.write_text(submission_text(fixture, **fill), encoding="utf-8")
    return path


def b64(text) -> str:
    return base64.b64encode(str(text).encode()).decode()


def grade_toy(path: Path, settings) -> GradeReport:
    return grade(path, solutions_dir=TOY_SOLUTIONS, settings=settings, secret=SECRET)


def grade_course(path: Path, settings) -> GradeReport:
    return grade(path, solutions_dir=REPO / "solutions", settings=settings, secret=SECRET)


def points(report: GradeReport) -> dict[str, float]:
    return {item.grade_id: item.points for item in report.items}


def feedback(report: GradeReport, grade_id: str) -> str:
    return next(item.feedback for item in report.items if item.grade_id == grade_id)


def require_isolation() -> None:
    "Attacks that would hit real files or processes when run unconfined are skipped where nothing confines them."
    prefix, how = sandbox.isolation()
    if prefix is None:
        pytest.skip(f"submissions are not confined here ({how}); this attack would act on the machine itself")


def require_cgroup() -> None:
    require_isolation()
    cgroup = sandbox.Cgroup.create(sandbox.Limits())
    if cgroup is None:
        pytest.skip("no cgroup can be made here, so nothing caps the number of processes")
    cgroup.destroy()


def hidden_test_lines(notebook: Path) -> list[str]:
    "The distinctive lines of a solution notebook's hidden tests (the markers are public: exercises.py has them)."
    lines = []
    for cell in nbformat.read(notebook, as_version=4).cells:
        inside = False
        for line in cell.source.split("\n"):
            if exercises.HIDDEN_BEGIN in line or exercises.HIDDEN_END in line:
                inside = exercises.HIDDEN_BEGIN in line
            elif inside and len(line.strip()) >= 20:
                lines.append(line.strip())
    return lines


def cli(*args: str, secret: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    "`openllm-edu ARGS` with the toy course's settings (the CLI reads them from $OPENLLM_EDU_SETTINGS)."
    env = {**os.environ, "OPENLLM_EDU_SETTINGS": str(FIXTURE / "settings.ini")}
    env.pop("OPENLLM_EDU_GRADER_SECRET", None)
    if secret is not None:
        env["OPENLLM_EDU_GRADER_SECRET"] = secret
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=timeout)


# ---------------------------------------------------------------- 1, 2: using the reference

@pytest.mark.parametrize("fixture, named", [
    ("import_as_03_lm_basics.py", "count_bigrams"),
    ("alias_module_03_lm_basics.py", "count_bigrams"),
    ("importlib_03_lm_basics.py", "importlib.import_module"),
    ("helper_03_lm_basics.py", "count_bigrams"),
])
def test_imported_reference_scores_zero(tmp_path, course_settings, fixture, named):
    report = grade_course(submission(tmp_path, fixture), course_settings)
    assert points(report) == {**COURSE_FULL, "bigram_counts": 0}, str(report)
    said = feedback(report, "bigram_counts")
    assert said.startswith("0 points:") and named in said, said


@pytest.fixture(scope="module")
def exec_report(tmp_path_factory, course_settings):
    return grade_course(submission(tmp_path_factory.mktemp("exec"), "exec_file_03_lm_basics.py"), course_settings)


def test_executing_the_library_source_scores_zero(exec_report):
    said = feedback(exec_report, "bigram_counts")
    assert exec_report.items[0].points == 0 and said.startswith("0 points:") and "__file__" in said, said


def test_reading_the_library_source_costs_every_item(exec_report):
    "Code brought in from the library's files can be used anywhere: the grader cannot tell which item, so all are 0."
    assert points(exec_report) == {item: 0 for item in COURSE_FULL}, str(exec_report)
    assert all("reads the course's own files" in item.feedback for item in exec_report.items)


@pytest.mark.parametrize("fixture, route", [
    ("computed_import_03_lm_basics.py", "imports a module by a computed name at the top level"),
    ("runtime_no_profile_03_lm_basics.py", "switches off the grader's watch"),
])
def test_hiding_what_is_imported_or_switching_off_the_watch_costs_every_item(tmp_path, course_settings, fixture,
                                                                            route):
    report = grade_course(submission(tmp_path, fixture), course_settings)
    assert points(report) == {item: 0 for item in COURSE_FULL}, str(report)
    assert all(route in item.feedback for item in report.items), str(report)


@pytest.mark.parametrize("fixture", ["runtime_lookup_03_lm_basics.py", "runtime_thread_03_lm_basics.py"])
def test_reference_reached_at_run_time_scores_zero(tmp_path, course_settings, fixture):
    report = grade_course(submission(tmp_path, fixture), course_settings)
    said = feedback(report, "bigram_counts")
    assert points(report) == {**COURSE_FULL, "bigram_counts": 0}, str(report)
    assert said.startswith("0 points: your code called the reference") and "count_bigrams" in said, said


def test_the_honest_course_submission_scores_full(tmp_path, course_settings):
    "The control for the two groups above: the same file without the cheat."
    report = grade_course(submission(tmp_path, "honest_03_lm_basics.py"), course_settings)
    assert points(report) == COURSE_FULL, str(report)


# ---------------------------------------------------------------- 3: fake results and patched helpers

@pytest.mark.parametrize("fixture", ["stdout_garbage_99_toy.py", "fd_garbage_99_toy.py", "forged_frames_99_toy.py",
                                     "patch_grading_99_toy.py", "forge_json_99_toy.py", "atexit_99_toy.py"])
def test_fake_results_change_no_score(tmp_path, toy_settings, fixture):
    report = grade_toy(submission(tmp_path, fixture), toy_settings)
    assert points(report) == RIGHT_WRONG_MISSING, str(report)
    assert json.loads(report.to_json())["total"] == 1
    if fixture.startswith("stdout"):  # what it printed is kept as output, not taken for answers
        assert '"result": "all tests passed"' in report.output and "garbage on fd 2" in report.output


# ---------------------------------------------------------------- 4: spying on the hidden tests

def test_stack_walking_finds_no_hidden_test(tmp_path, toy_settings):
    report = grade_toy(submission(tmp_path, "frames_99_toy.py"), toy_settings)
    assert points(report) == {**FULL, "running_sum": 0}, str(report)
    assert "SPY FOUND NOTHING" in report.output, report.output  # it ran, and the worker holds nothing of the test
    shown = "\n".join([str(report), report.output, *(item.feedback for item in report.items)])
    hidden = hidden_test_lines(TOY_SOLUTIONS / "99_toy.ipynb")
    assert len(hidden) >= 6 and [line for line in hidden if line in shown] == []


# ---------------------------------------------------------------- 5: reading the solutions

def test_solutions_and_secrets_cannot_be_read(tmp_path, toy_settings, monkeypatch):
    secret_marker = f"grader-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPENLLM_EDU_GRADER_SECRET", secret_marker)  # in the grader's environment only
    paths = [REPO / "solutions" / "99_toy.ipynb", TOY_SOLUTIONS / "99_toy.ipynb", REPO / "settings.ini",
             FIXTURE / "settings.ini", Path(__file__)]
    path = submission(tmp_path, "read_solutions_99_toy.py", PATHS_B64=b64(json.dumps([str(p) for p in paths])),
                      REPO_B64=b64(REPO), NOTEBOOK_B64=b64("solutions/99_toy.ipynb"))
    report = grade_toy(path, toy_settings)
    assert points(report) == FULL, str(report)
    output = report.output
    assert not report.output_truncated and "LISTING /:" in output, output
    assert "READ OK" not in output, output
    assert all(f"NOT FOUND {p}:" in output for p in paths), output
    repo_listing = next(line for line in output.splitlines() if line.startswith(f"LISTING {REPO}:"))
    assert not {"solutions", "settings.ini", "tests", "exercises", "nbs"} & set(ast.literal_eval(repo_listing.split(": ", 1)[1]))
    for text in ("BEGIN SOLUTION", "HIDDEN TESTS", "[exercises.99_toy]", "itertools", secret_marker):
        assert text not in output and text not in str(report)


# ---------------------------------------------------------------- 6: writing outside the sandbox

def test_writes_outside_the_sandbox_change_nothing(tmp_path, toy_settings):
    require_isolation()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for p in (tmp_path, victim):
        p.chmod(0o777)  # writable for anyone who can see it: only the sandbox stops the attack
    core = Path(sys.modules["openllm_edu.core"].__file__)
    core_before = core.read_bytes()
    pth = Path(site.getsitepackages()[0]) / f"openllm_edu_attack_{uuid.uuid4().hex[:8]}.pth"
    path = submission(tmp_path, "write_outside_99_toy.py", VICTIM=str(victim), PTH_NAME=pth.name)
    try:
        report = grade_toy(path, toy_settings)
    finally:
        changed_core, planted = core.read_bytes() != core_before, pth.exists()
        if changed_core and core.read_bytes().endswith(b"raise SystemExit('patched')\n"):
            core.write_bytes(core_before)
        pth.unlink(missing_ok=True)
    assert victim.read_text() == "precious"
    assert not changed_core and not planted
    assert points(report) == FULL, str(report)
    assert "DONE" not in report.output and report.output.count("FAILED") == 4, report.output


def test_writing_the_package_through_its_file_changes_nothing(tmp_path, toy_settings):
    require_isolation()
    core = Path(sys.modules["openllm_edu.core"].__file__)
    before = core.read_bytes()
    try:
        report = grade_toy(submission(tmp_path, "overwrite_core_99_toy.py"), toy_settings)
    finally:
        after = core.read_bytes()
        if after != before and after.endswith(b"raise SystemExit('patched')\n"):
            core.write_bytes(before)
    assert after == before
    assert "DONE" not in report.output
    # The notebook names the library's file: the static rule scores every item 0 for that.
    assert report.total == 0 and all("__file__" in item.feedback for item in report.items), str(report)


# ---------------------------------------------------------------- 7, 8: processes

def _processes_with(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            text = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            text += " " + (entry / "comm").read_text()
        except OSError:
            continue
        if marker in text:
            found.append(f"{entry.name}: {text.strip()}")
    return found


def test_no_process_outlives_the_grading(tmp_path, toy_settings):
    require_isolation()
    folder = tmp_path / "escape"
    folder.mkdir()
    folder.chmod(0o777)
    marker = f"ole{uuid.uuid4().hex[:8]}"
    report = grade_toy(submission(tmp_path, "setsid_99_toy.py", MARKER=marker, FOLDER=str(folder)), toy_settings)
    assert points(report) == FULL, str(report)
    assert not report.cell_errors, report.cell_errors
    time.sleep(5)  # the children write 3 s after they start
    assert list(folder.iterdir()) == []
    assert _processes_with(marker) == []


def test_fork_bomb_is_capped(tmp_path, toy_settings):
    require_cgroup()
    start = time.monotonic()
    report = grade_toy(submission(tmp_path, "fork_bomb_99_toy.py"), toy_settings)
    assert time.monotonic() - start < toy_settings.grader.timeout_seconds + 15
    assert points(report) == FULL, str(report)
    assert not report.problem, report.problem


# ---------------------------------------------------------------- 9: memory

def test_reserved_but_untouched_memory_is_not_counted(tmp_path, toy_settings):
    report = grade_toy(submission(tmp_path, "mmap_virtual_99_toy.py"), toy_settings)
    assert points(report) == FULL and report.cell_errors == [], str(report)
    assert "reserved 20 GiB" in report.output


def test_allocating_past_the_limit_costs_only_that_cell(tmp_path, toy_settings):
    # Touching 2 GiB takes seconds on a slow machine: give the cell time, so that only the memory limit can stop it.
    limits = dataclasses.replace(toy_settings.grader, cell_timeout_seconds=60, timeout_seconds=120)
    report = grade_toy(submission(tmp_path, "allocate_3gb_99_toy.py"), dataclasses.replace(toy_settings, grader=limits))
    assert points(report) == FULL, str(report)
    assert len(report.cell_errors) == 1 and report.cell_errors[0].startswith("cell 4"), report.cell_errors
    assert "memory" in report.cell_errors[0].lower()


# ---------------------------------------------------------------- 10: gradings side by side

def _side_by_side(tmp_path, pool) -> tuple[list[GradeReport], bytes, Path]:
    solutions = tmp_path / "solutions"
    shutil.copytree(TOY_SOLUTIONS, solutions)
    target = solutions / "99_toy.ipynb"
    original = target.read_bytes()
    honest = submission(tmp_path, "honest_99_toy.py", "alice_99_toy.py")
    destructive = submission(tmp_path, "destructive_99_toy.py", "mallory_99_toy.py", TARGET_B64=b64(target))
    settings = load_settings(FIXTURE / "settings.ini")
    futures = [pool.submit(grade, p, solutions_dir=solutions, settings=settings, secret=SECRET)
               for p in (honest, destructive)]
    return [f.result(timeout=120) for f in futures], original, target


def test_parallel_gradings_in_processes(tmp_path):
    require_isolation()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        (honest, destructive), original, target = _side_by_side(tmp_path, pool)
    assert target.read_bytes() == original
    assert points(honest) == FULL, str(honest)
    assert points(destructive) == FULL and "DONE" not in destructive.output, str(destructive)


def test_parallel_gradings_in_threads(tmp_path):
    require_isolation()
    with ThreadPoolExecutor(2) as pool:
        (honest, destructive), original, target = _side_by_side(tmp_path, pool)
    assert target.read_bytes() == original
    assert points(honest) == FULL, str(honest)


# ---------------------------------------------------------------- 11: answers that cannot be sent

@pytest.mark.parametrize("fixture, item, kind", [
    ("unsendable_lambda_99_toy.py", "running_sum", "function"),
    ("unsendable_module_99_toy.py", "softmax", "Softmax"),
    ("unsendable_file_99_toy.py", "histogram", "TextIOWrapper"),
])
def test_unsendable_results_score_zero_with_a_reason(tmp_path, toy_settings, fixture, item, kind):
    report = grade_toy(submission(tmp_path, fixture), toy_settings)
    assert points(report) == {**FULL, item: 0}, str(report)
    said = feedback(report, item)
    assert "cannot" in said and kind in said, said
    assert not report.problem


# ---------------------------------------------------------------- 12: unusual but correct files

def solved_notebook(solution) -> nbformat.NotebookNode:
    "The released exercise with every solution cell filled in, as a student would hand it in."
    nb = exercises.release_notebook(solution, "99_toy")
    answers = {exercises.nbgrader_of(c).get("grade_id"): c.source for c in solution.cells}
    for cell in nb.cells:
        grade_id = exercises.nbgrader_of(cell).get("grade_id", "")
        if grade_id.endswith("_code"):
            cell.source = answers[grade_id]
    return nb


def notebook_text(nb) -> str:
    return nbformat.writes(nb, version=4)


def _ipynb_bom(tmp_path, solution):
    path = tmp_path / "bom_99_toy.ipynb"
    path.write_bytes(b"\xef\xbb\xbf" + notebook_text(solved_notebook(solution)).encode())
    return path


def _py_bom(tmp_path, solution):
    path = tmp_path / "bom_99_toy.py"
    path.write_bytes(b"\xef\xbb\xbf" + submission_text("honest_99_toy.py").encode())
    return path


def _py_crlf(tmp_path, solution):
    path = tmp_path / "crlf_99_toy.py"
    path.write_bytes(submission_text("honest_99_toy.py").encode().replace(b"\n", b"\r\n"))
    return path


def _ipynb_crlf(tmp_path, solution):
    nb = solved_notebook(solution)
    for cell in nb.cells:
        cell.source = cell.source.replace("\n", "\r\n")
    path = tmp_path / "crlf_99_toy.ipynb"
    path.write_bytes(notebook_text(nb).replace("\n", "\r\n").encode())
    return path


def _odd_metadata(tmp_path, solution):
    nb = json.loads(notebook_text(solved_notebook(solution)))
    for cell in nb["cells"]:
        meta = cell["metadata"].get("nbgrader", {})
        if meta.get("solution") or meta.get("grade_id") == "imports":
            cell["metadata"] = {"nbgrader": "garbage", "tags": 5, "collapsed": "yes", "jupyter": None}
    path = tmp_path / "odd_metadata_99_toy.ipynb"
    path.write_text(json.dumps(nb))
    return path


def _no_imports_cell(tmp_path, solution):
    nb = solved_notebook(solution)
    nb.cells = [c for c in nb.cells if exercises.nbgrader_of(c).get("grade_id") != "imports"]
    for cell in nb.cells:
        if exercises.nbgrader_of(cell).get("grade_id", "").endswith("_code"):
            head, _, body = cell.source.partition("\n")
            cell.source = f"{head}\n    import numpy as np\n    import torch\n{body}"
    path = tmp_path / "no_imports_99_toy.ipynb"
    nbformat.write(nb, path)
    return path


def _magics(tmp_path, solution):
    nb = solved_notebook(solution)
    nb.cells.insert(1, nbformat.v4.new_code_cell("%matplotlib inline\n!echo hi\n%load_ext autoreload"))
    histogram = next(c for c in nb.cells if exercises.nbgrader_of(c).get("grade_id") == "histogram_code")
    histogram.source = "%%time\n" + histogram.source
    path = tmp_path / "magics_99_toy.ipynb"
    nbformat.write(nb, path)
    return path


def _percent_continuation(tmp_path, solution):
    return submission(tmp_path, "percent_continuation_99_toy.py")


def _other_assignment(tmp_path, solution):
    nb = solved_notebook(solution)
    nb.metadata["openllm_edu"]["assignment"] = "03_lm_basics"
    path = tmp_path / "mallory_99_toy.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("build", [_ipynb_bom, _py_bom, _py_crlf, _ipynb_crlf, _odd_metadata, _no_imports_cell,
                                   _magics, _percent_continuation, _other_assignment],
                         ids=lambda f: f.__name__.strip("_"))
def test_unusual_but_correct_files_score_full(tmp_path, toy_settings, solution, build):
    report = grade_toy(build(tmp_path, solution), toy_settings)
    assert points(report) == FULL, str(report)
    assert report.assignment == "99_toy"
    if build is _other_assignment:
        assert any("03_lm_basics" in flag for flag in report.flags), report.flags
    if build is _magics:
        assert report.cell_errors == [], report.cell_errors


# ---------------------------------------------------------------- 13: seeds

def test_seeds_are_reproducible_and_per_file(tmp_path, toy_settings):
    text = submission_text("honest_99_toy.py").replace("return e / e.sum(dim=-1, keepdim=True)", "return e")
    first = tmp_path / "ann_99_toy.py"
    first.write_text(text)
    second = tmp_path / "ben_99_toy.py"
    second.write_text(text)
    one, again, other = grade_toy(first, toy_settings), grade_toy(first, toy_settings), grade_toy(second, toy_settings)
    assert one.seed == again.seed == grading_seed(SECRET, "99_toy", first.name)
    assert one.items == again.items and points(one) == {**FULL, "softmax": 0}
    assert "is wrong on case" in feedback(one, "softmax")  # the hidden cases ran, so the seed mattered
    assert other.seed == grading_seed(SECRET, "99_toy", second.name) != one.seed


def test_secret_file_changes_the_seed(tmp_path):
    path = submission(tmp_path, "honest_99_toy.py", "cy_99_toy.py")
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("s3cret\n")
    base = ["grade", str(path), "--json", "--solutions", str(TOY_SOLUTIONS)]
    plain, keyed = cli(*base), cli(*base, "--secret-file", str(secret_file))
    assert plain.returncode == 0 and keyed.returncode == 0, plain.stderr + keyed.stderr
    plain_report, keyed_report = json.loads(plain.stdout), json.loads(keyed.stdout)
    assert plain_report["seed"] == grading_seed("", "99_toy", path.name)
    assert keyed_report["seed"] == grading_seed("s3cret", "99_toy", path.name) != plain_report["seed"]
    assert plain_report["total"] == keyed_report["total"] == 5


# ---------------------------------------------------------------- 14: a class folder

def _class_folder(folder: Path, solution) -> dict[str, str]:
    "Six submissions; student -> expected total ('' for the file that cannot be graded)."
    folder.mkdir()
    solved = solved_notebook(solution)
    nbformat.write(solved, folder / "alice.ipynb")
    nbformat.write(exercises.release_notebook(solution, "99_toy"), folder / "bob.ipynb")
    half = exercises.release_notebook(solution, "99_toy")
    for cell, done in zip(half.cells, solved.cells):
        if exercises.nbgrader_of(cell).get("grade_id") in ("running_sum_code", "histogram_code"):
            cell.source = done.source
    nbformat.write(half, folder / "carol.ipynb")
    cheat = submission_text("honest_99_toy.py") + \
        '\n# %%\ntry:\n    print(open("../solutions/99_toy.ipynb").read())\nexcept OSError:\n    pass\n'
    (folder / "dave.py").write_text(cheat)
    (folder / "erin.ipynb").write_text("this is not a notebook\n")
    (folder / "frank.ipynb").write_bytes(b"\xef\xbb\xbf" + notebook_text(solved).encode())
    return {"alice": "5", "bob": "0", "carol": "3", "dave": "0", "erin": "", "frank": "5"}


def _rows(csv_path: Path) -> dict[str, dict]:
    return {row["student"]: row for row in csv.DictReader(io.StringIO(csv_path.read_text()))}


def test_class_folder_gradebook(tmp_path, toy_settings, solution):
    folder = tmp_path / "class"
    expected = _class_folder(folder, solution)
    book = grade_folder(folder, assignment="99_toy", out=tmp_path / "one", jobs=1, solutions_dir=TOY_SOLUTIONS,
                        settings=toy_settings, secret=SECRET)
    rows = _rows(book)
    assert {s: r["total"] for s, r in rows.items()} == expected
    assert [rows["carol"][i] for i in FULL] == ["1", "0", "2"]
    assert all(rows[s]["max_total"] == "5" for s in expected if s != "erin")
    assert "not a readable notebook" in rows["erin"]["problem"]
    assert "reads the course's own files" in json.loads((tmp_path / "one" / "dave.json").read_text())["items"][0][
        "feedback"]

    parallel = grade_folder(folder, assignment="99_toy", out=tmp_path / "two", jobs=2, solutions_dir=TOY_SOLUTIONS,
                            settings=toy_settings, secret=SECRET)
    assert parallel.read_text() == book.read_text()

    (folder / "carol.ipynb").unlink()
    regraded = grade_folder(folder, assignment="99_toy", out=tmp_path / "one", jobs=2, solutions_dir=TOY_SOLUTIONS,
                            settings=toy_settings, secret=SECRET)
    assert regraded.read_text() == parallel.read_text()  # carol's earlier report is kept

    run = cli("grade", str(folder), "--assignment", "99_toy", "--out", str(tmp_path / "cli"),
              "--solutions", str(TOY_SOLUTIONS), secret=SECRET)
    assert run.returncode == 0, run.stderr
    assert f"gradebook: {tmp_path / 'cli' / 'gradebook.csv'}" in run.stdout and "alice: 5 / 5" in run.stdout
    assert _rows(tmp_path / "cli" / "gradebook.csv") == {s: r for s, r in rows.items() if s != "carol"}


def test_folder_without_out_is_one_line_and_status_2(tmp_path):
    (tmp_path / "class").mkdir()
    run = cli("grade", str(tmp_path / "class"), "--assignment", "99_toy", "--solutions", str(TOY_SOLUTIONS))
    assert run.returncode == 2 and run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1 and "--out" in run.stderr, run.stderr


# ---------------------------------------------------------------- 15: report hygiene

def test_report_text_is_clean_and_bounded(tmp_path, toy_settings):
    report = grade_toy(submission(tmp_path, "hygiene_99_toy.py"), toy_settings)
    assert points(report) == {**FULL, "running_sum": 0}, str(report)
    text = str(report)
    for shown in (text, report.output, report_markdown(report), *report.cell_errors, report.problem):
        assert "\x1b" not in shown and "\x07" not in shown
    assert all(len(item.feedback) <= 2100 for item in report.items), [len(i.feedback) for i in report.items]
    assert report.cell_errors and all(len(e) <= 2100 for e in report.cell_errors)
    assert len(text) < 20_000
    assert "ValueError" in feedback(report, "running_sum")
