"""The grader: check helpers, release, the wire format, and grading submissions that behave and misbehave.

Most tests grade submissions of a toy assignment (tests/fixtures/grading/solutions/99_toy.ipynb, 5 points:
running_sum 1, softmax 2, histogram 2) under the small limits of tests/fixtures/grading/settings.ini.
The last tests grade the real course's solution notebooks and their released exercises. Attacks on the
grader (cheating, escaping the sandbox) are in tests/test_grading_attacks.py.
"""
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import jupytext
import nbformat
import numpy as np
import pytest
import torch

from openllm_edu import exercises, grading, sandbox, wire
from openllm_edu.autograde import GradeReport, grade
from openllm_edu.core import CourseError, load_settings
from openllm_edu.exercises import release, release_differences
from openllm_edu.grading import Case, check_against_reference, difference, expect_equal, grader_seed, in_submission

FIXTURE = Path(__file__).parent / "fixtures" / "grading"
REPO = Path(__file__).resolve().parents[1]
FULL = {"running_sum": 1, "softmax": 2, "histogram": 2}

@pytest.fixture(scope="module")
def settings():
    return load_settings(FIXTURE / "settings.ini")


@pytest.fixture()
def course(tmp_path):
    "A private copy of the toy course: solutions/ and the released exercises/."
    shutil.copytree(FIXTURE / "solutions", tmp_path / "solutions")
    return tmp_path


@pytest.fixture(scope="module")
def solution():
    return nbformat.read(FIXTURE / "solutions" / "99_toy.ipynb", as_version=4)


def solution_code(nb, grade_id: str) -> str:
    "The source of the solution cell whose grade_id is `<grade_id>_code`."
    return next(c.source for c in nb.cells if exercises.nbgrader_of(c).get("grade_id") == f"{grade_id}_code")


def script(tmp_path: Path, name: str, *cells: str) -> Path:
    "A jupytext percent submission made of `cells`, with the toy assignment's imports first."
    path = tmp_path / name
    path.write_text("".join(f"# %%\n{c}\n\n" for c in ("import numpy as np\nimport torch", *cells)))
    return path


def points(report: GradeReport) -> dict[str, float]:
    return {item.grade_id: item.points for item in report.items}


def feedback(report: GradeReport, grade_id: str) -> str:
    return next(item.feedback for item in report.items if item.grade_id == grade_id)


# ---------------------------------------------------------------- check helpers

@pytest.mark.parametrize("actual, expected, message", [
    (torch.zeros(2, 16, 8), torch.zeros(2, 8, 16), "shape (2, 8, 16) expected, got (2, 16, 8)"),
    (torch.zeros(3), torch.zeros(3, dtype=torch.int64), "dtype torch.int64 expected, got torch.float32"),
    ({(3, 4): 3}, {(3, 4): 2}, "key (3, 4): 2 expected, got 3"),
    ({}, {(3, 4): 2}, "1 keys expected, got 0: missing key (3, 4)"),
    ({(3, 4): 2, 5: 1}, {(3, 4): 2}, "1 keys expected, got 2: unexpected key 5"),
    (None, [1], "returned None — did you forget `return`?"),
    ([1, 2], [1, 3], "result[1]: 3 expected, got 2"),
    ([1, 2, 3], [1, 2], "length 2 expected, got 3"),
    (np.zeros((2, 3)), np.zeros((3, 2)), "shape (3, 2) expected, got (2, 3)"),
    (np.zeros(3, dtype=np.int32), np.zeros(3, dtype=np.int64), "dtype int64 expected, got int32"),
    (np.dtype(np.int32), np.dtype(np.uint16), "numpy dtype uint16 expected, got int32"),
    ([1, 2], np.array([1, 2]), "a numpy array expected, got list [1, 2]"),
    (3.0, 3, "an integer expected, got float 3.0"),
    (torch.tensor(3), 3, "a number expected, got torch.Tensor"),
    ("abd", "abc", "first difference at position 2: 'abc' expected, got 'abd'"),
    (b"ab", "ab", "str expected, got bytes b'ab'"),
    ({1}, {1, 2}, "missing [2]"),
    (1, True, "a bool expected, got int 1"),
])
def test_difference_says_what_differs(actual, expected, message):
    assert difference(actual, expected).startswith(message)


def test_difference_accepts_equal_values_and_tolerances():
    assert difference([1, (2, 3)], [1, [2, 3]]) is None  # lists and tuples are interchangeable
    assert difference({"a": [np.int64(1)]}, {"a": [1]}) is None
    assert difference(0.1 + 0.2, 0.3) is not None and difference(0.1 + 0.2, 0.3, atol=1e-12) is None
    assert difference(float("nan"), float("nan")) is None
    assert difference(torch.tensor([1.0, 2.0]) + 1e-7, torch.tensor([1.0, 2.0]), atol=1e-6) is None
    assert "largest difference" in difference(torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0]), atol=1e-6)
    assert difference(np.uint16, np.dtype("uint16")) is None


def test_expect_equal_prefixes_what_was_checked():
    expect_equal([1], [1], "x")
    with pytest.raises(AssertionError, match=r"^logits: shape \(3, 2\) expected, got \(2, 3\)$"):
        expect_equal(torch.ones(2, 3), torch.ones(3, 2), "logits")


def test_check_against_reference_reports_the_failing_input():
    def wrong_sum(xs):
        return sum(xs) + (1 if len(xs) > 2 else 0)
    with pytest.raises(AssertionError) as info:
        check_against_reference(wrong_sum, sum, [([1],), ([1, 2],), ([1, 2, 3],)])
    text = str(info.value)
    assert "wrong_sum is wrong on case 3 of 3" in text and "wrong_sum([1, 2, 3])" in text
    assert "6 expected, got 7" in text


def test_check_against_reference_reports_student_errors_with_their_line():
    def crashes(xs):
        return xs[10]
    with pytest.raises(AssertionError) as info:
        check_against_reference(crashes, lambda xs: 0, [[1, 2]])
    text = str(info.value)
    assert "IndexError: list index out of range" in text and "crashes([1, 2])" in text
    assert "`return xs[10]`" in text


def test_check_against_reference_special_cases():
    def todo(x):
        raise NotImplementedError()
    with pytest.raises(AssertionError, match="todo is not implemented yet"):
        check_against_reference(todo, abs, [1])
    with pytest.raises(AssertionError, match="did you forget `return`"):
        check_against_reference(lambda x: None, abs, [1], name="f")
    with pytest.raises(AssertionError, match=r"ValueError expected \(math domain error\)"):
        check_against_reference(lambda x: 0.0, math.sqrt, [-1.0], name="root")
    assert check_against_reference(math.sqrt, math.sqrt, [-1.0, 4.0]) == 2  # both raise, then both agree
    assert check_against_reference(lambda a, b=0: a + b, lambda a, b=0: b + a, [Case((1,), {"b": 2})]) == 1
    with pytest.raises(AssertionError, match="differs from the reference"):
        check_against_reference(lambda x: x, lambda x: -x, [1], compare=lambda a, e: a == e)


def test_inputs_are_copied_for_each_function():
    def clears(xs):
        xs.clear()
        return 0
    assert check_against_reference(clears, lambda xs: len(xs) * 0, [([1, 2],)]) == 1


def test_grader_seed_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(grading.SEED_ENV, "1234")
    assert grader_seed() == 1234
    monkeypatch.delenv(grading.SEED_ENV)
    assert grader_seed() == grader_seed()  # one random seed per process
    monkeypatch.setenv(grading.SEED_ENV, "lots")
    with pytest.raises(CourseError, match="whole number"):
        grader_seed()


# ---------------------------------------------------------------- release

def test_release_is_deterministic_and_strips_every_region(course, settings, solution):
    first = release(course / "solutions", course / "a", settings)
    second = release(course / "solutions", course / "b", settings)
    assert [p.name for p in first] == ["99_toy.ipynb"]
    assert first[0].read_bytes() == second[0].read_bytes()
    text = first[0].read_text()
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "HIDDEN TESTS", "itertools", "bincount"):
        assert marker not in text
    exercise = nbformat.read(first[0], as_version=4)
    assert exercise.metadata["openllm_edu"]["assignment"] == "99_toy"
    assert [c.metadata for c in exercise.cells] == [c.metadata for c in solution.cells]
    assert all(c.outputs == [] and c.execution_count is None for c in exercise.cells if c.cell_type == "code")
    stub = next(c.source for c in exercise.cells if c.source.startswith("def running_sum"))
    assert stub == "def running_sum(xs):\n    # YOUR CODE HERE\n    raise NotImplementedError()"
    before = first[0].stat().st_mtime_ns
    release(course / "solutions", course / "a", settings)
    assert first[0].stat().st_mtime_ns == before, "an unchanged exercise is not rewritten"


def test_release_differences(course, settings):
    solutions, exercises = course / "solutions", course / "exercises"
    assert any("is missing" in d for d in release_differences(solutions, exercises, settings))
    [path] = release(solutions, exercises, settings)
    assert release_differences(solutions, exercises, settings) == []
    path.write_bytes(path.read_bytes().replace(b"YOUR CODE HERE", b"my code"))
    (exercises / "old.ipynb").write_text("{}")
    differences = release_differences(solutions, exercises, settings)
    assert len(differences) == 2
    assert "99_toy.ipynb differs" in differences[0] and "old.ipynb has no solution notebook" in differences[1]


def test_points_must_match_settings(course, settings):
    wrong = dataclasses.replace(settings, exercise_points={"99_toy": {**FULL, "softmax": 3}})
    with pytest.raises(CourseError) as info:
        release(course / "solutions", course / "exercises", wrong)
    text = str(info.value)
    assert "99_toy.ipynb" in text and "'softmax': 2 points in the notebook, 3 in settings.ini" in text
    missing = dataclasses.replace(settings, exercise_points={"99_toy": {**FULL, "extra": 1}})
    with pytest.raises(CourseError, match="'extra': 1 points in settings.ini"):
        release(course / "solutions", course / "exercises", missing)
    with pytest.raises(CourseError, match=r"no \[exercises.99_toy\] section"):
        release(course / "solutions", course / "exercises", dataclasses.replace(settings, exercise_points={}))


def test_release_rejects_malformed_solutions(course, settings, solution):
    broken = nbformat.from_dict(json.loads(json.dumps(solution)))
    graded = [c for c in broken.cells if exercises.is_graded_cell(c)]
    graded[1].metadata["nbgrader"]["grade_id"] = graded[0].metadata["nbgrader"]["grade_id"]
    nbformat.write(broken, course / "solutions" / "99_toy.ipynb")
    with pytest.raises(CourseError, match="'running_sum' is used twice"):
        release(course / "solutions", course / "exercises", settings)
    unclosed = nbformat.from_dict(json.loads(json.dumps(solution)))
    cell = next(c for c in unclosed.cells if "### END SOLUTION" in c.source)
    cell.source = cell.source.replace("### END SOLUTION", "")
    nbformat.write(unclosed, course / "solutions" / "99_toy.ipynb")
    with pytest.raises(CourseError, match="never closed"):
        release(course / "solutions", course / "exercises", settings)


# ---------------------------------------------------------------- grading: scores

def test_solution_scores_full_marks_and_exercise_zero(course, settings):
    solutions = course / "solutions"
    full = grade(solutions / "99_toy.ipynb", solutions_dir=solutions, settings=settings)
    assert points(full) == FULL and (full.total, full.max_total) == (5, 5)
    assert all(item.passed for item in full.items) and not full.cell_errors and not full.problem
    [exercise] = release(solutions, course / "exercises", settings)
    empty = grade(exercise, solutions_dir=solutions, settings=settings)
    assert empty.total == 0 and empty.max_total == 5
    assert "running_sum is not implemented yet" in feedback(empty, "running_sum")


def test_half_done_submission_scores_in_between(course, settings, solution):
    solutions = course / "solutions"
    [exercise] = release(solutions, course / "exercises", settings)
    nb = nbformat.read(exercise, as_version=4)
    for cell in nb.cells:
        for grade_id in ("running_sum", "histogram"):
            if exercises.nbgrader_of(cell).get("grade_id") == f"{grade_id}_code":
                cell.source = solution_code(solution, grade_id)
    submission = course / "alice_99_toy.ipynb"
    nbformat.write(nb, submission)
    report = grade(submission, solutions_dir=solutions, settings=settings, seed=7)
    assert points(report) == {"running_sum": 1, "softmax": 0, "histogram": 2}
    assert report.seed == 7 and report.assignment == "99_toy"  # the name comes from the file name
    assert "softmax is not implemented yet" in feedback(report, "softmax")


def test_wrong_answer_gets_actionable_feedback(tmp_path, settings, solution):
    wrong_softmax = "def softmax(x):\n    return torch.exp(x) / torch.exp(x).sum(dim=0, keepdim=True)"
    wrong_histogram = "def histogram(values, bins):\n    return np.bincount(values, minlength=bins).astype(np.int32)"
    path = script(tmp_path, "bob_99_toy.py", solution_code(solution, "running_sum"), wrong_softmax, wrong_histogram)
    report = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings)
    assert points(report) == {"running_sum": 1, "softmax": 0, "histogram": 0}
    assert "softmax is wrong on case" in feedback(report, "softmax") and "values differ" in feedback(report, "softmax")
    assert feedback(report, "histogram").startswith("histogram([0, 2, 2], 3): dtype int64 expected, got int32")
    assert "bob_99_toy.py" in str(report) and "histogram" in str(report)


def test_jupytext_submissions(tmp_path, settings, solution):
    "A percent script with metadata scores like the notebook; one without it still has its test cells replaced."
    (tmp_path / "carol_99_toy.py").write_text(jupytext.writes(solution, fmt="py:percent"))
    report = grade(tmp_path / "carol_99_toy.py", solutions_dir=FIXTURE / "solutions", settings=settings)
    assert report.total == 5 and report.assignment == "99_toy"
    exercise = exercises.release_notebook(solution, "99_toy")
    for cell in exercise.cells:
        cell.metadata = {}
    plain = jupytext.writes(exercise, fmt="py:percent")
    assert "nbgrader" not in plain
    (tmp_path / "dan_99_toy.py").write_text(plain)
    report = grade(tmp_path / "dan_99_toy.py", solutions_dir=FIXTURE / "solutions", settings=settings)
    assert report.total == 0 and report.cell_errors == []  # visible tests were not run as the student's cells


def test_assignment_must_be_known(tmp_path, settings, solution):
    (tmp_path / "homework.py").write_text(jupytext.writes(solution, fmt="py:percent"))
    with pytest.raises(CourseError, match="pass --assignment"):
        grade(tmp_path / "homework.py", solutions_dir=FIXTURE / "solutions", settings=settings)
    report = grade(tmp_path / "homework.py", assignment="99_toy", solutions_dir=FIXTURE / "solutions",
                   settings=settings)
    assert report.total == 5
    with pytest.raises(CourseError, match="no solution notebook"):
        grade(tmp_path / "homework.py", assignment="98_nothing", solutions_dir=FIXTURE / "solutions",
              settings=settings)
    (tmp_path / "notes_99_toy.txt").write_text("hello")
    with pytest.raises(CourseError, match=".ipynb notebook or a jupytext"):
        grade(tmp_path / "notes_99_toy.txt", solutions_dir=FIXTURE / "solutions", settings=settings)


def test_report_as_json(tmp_path, settings, solution):
    path = script(tmp_path, "eve_99_toy.py", solution_code(solution, "running_sum"))
    data = json.loads(grade(path, solutions_dir=FIXTURE / "solutions", settings=settings, seed=3).to_json())
    assert (data["total"], data["max_total"], data["seed"], data["assignment"]) == (1, 5, 3, "99_toy")
    assert [item["grade_id"] for item in data["items"]] == list(FULL)
    assert data["items"][1]["feedback"].startswith("NameError: name 'softmax' is not defined")


# ---------------------------------------------------------------- grading: misbehaving submissions

def all_solutions(solution) -> list[str]:
    return [solution_code(solution, g) for g in FULL]


def test_top_level_infinite_loop_costs_nothing_but_time(tmp_path, settings, solution):
    path = script(tmp_path, "loop_99_toy.py", *all_solutions(solution), "while True:\n    pass")
    report = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings)
    assert report.total == 5
    assert report.cell_errors and "timed out after 2 s" in report.cell_errors[0]


def test_infinite_loop_inside_a_graded_function(tmp_path, settings, solution):
    looping = "def softmax(x):\n    while True:\n        pass"
    path = script(tmp_path, "loop_99_toy.py", solution_code(solution, "running_sum"), looping,
                  solution_code(solution, "histogram"))
    report = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings)
    assert points(report) == {"running_sum": 1, "softmax": 0, "histogram": 2}
    assert "timed out" in feedback(report, "softmax")


def test_a_loop_that_swallows_the_timer_costs_only_its_cell(tmp_path, settings, solution):
    "The worker stops answering; the grader ends it, skips that cell, and runs the others in a fresh worker."
    stubborn = "import time\nwhile True:\n    try:\n        time.sleep(10)\n    except BaseException:\n        pass"
    path = script(tmp_path, "stubborn_99_toy.py", *all_solutions(solution), stubborn)
    start = time.monotonic()
    report = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings)
    assert time.monotonic() - start < settings.grader.timeout_seconds + 10
    assert report.total == 5, str(report)
    assert any(e.startswith("cell 5:") and "skipped" in e for e in report.cell_errors), report.cell_errors


def test_a_loop_that_swallows_the_timer_hits_the_wall_clock(tmp_path, settings, solution):
    "With no time left for a second worker, every item says why it was not run."
    stubborn = "import time\nwhile True:\n    try:\n        time.sleep(10)\n    except BaseException:\n        pass"
    path = script(tmp_path, "stubborn_99_toy.py", *all_solutions(solution), stubborn)
    limits = dataclasses.replace(settings.grader, timeout_seconds=5)
    start = time.monotonic()
    report = grade(path, solutions_dir=FIXTURE / "solutions", settings=dataclasses.replace(settings, grader=limits))
    assert time.monotonic() - start < 5 + 10
    assert report.total == 0 and "time limit ran out in cell 5" in report.problem, str(report)
    assert all(item.feedback == f"not run: {report.problem}" for item in report.items)


def test_import_failure_costs_only_what_depends_on_it(tmp_path, settings, solution):
    broken = "import does_not_exist\n\n" + solution_code(solution, "running_sum")
    path = script(tmp_path, "frank_99_toy.py", broken, solution_code(solution, "softmax"),
                  solution_code(solution, "histogram"))
    report = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings)
    assert points(report) == {"running_sum": 0, "softmax": 2, "histogram": 2}
    assert "ModuleNotFoundError: No module named 'does_not_exist'" in report.cell_errors[0]
    assert "`import does_not_exist`" in report.cell_errors[0]
    assert "NameError: name 'running_sum' is not defined" in feedback(report, "running_sum")


def test_syntax_error_is_reported(tmp_path, settings, solution):
    path = script(tmp_path, "gina_99_toy.py", *all_solutions(solution), "def oops(:\n    pass")
    report = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings)
    assert report.total == 5 and "SyntaxError" in report.cell_errors[0] and "cell 5 line 1" in report.cell_errors[0]


def test_allocating_50_gb(tmp_path, settings, solution):
    greedy_histogram = ("def histogram(values, bins):\n"
                        "    scratch = torch.empty(50 * 2**30, dtype=torch.uint8)\n"
                        "    return np.bincount(values, minlength=bins)")
    path = script(tmp_path, "hal_99_toy.py", "big = bytearray(50 * 2**30)", solution_code(solution, "running_sum"),
                  solution_code(solution, "softmax"), greedy_histogram)
    report = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings)
    assert points(report) == {"running_sum": 1, "softmax": 2, "histogram": 0}
    assert "MemoryError" in report.cell_errors[0] and "2048 MB" in report.cell_errors[0]
    assert "allocate" in feedback(report, "histogram")


def test_printing_megabytes_is_cut_and_still_scored(tmp_path, settings, solution):
    chatty = "for _ in range(5):\n    print('x' * 1_000_000)"
    path = script(tmp_path, "ivy_99_toy.py", chatty, *all_solutions(solution))
    report = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings)
    assert report.total == 5
    assert report.output_truncated and len(report.output.encode()) == 16 * 1024
    assert report.dropped_output_bytes == 5 * 1_000_001 - 16 * 1024
    assert "printed too much" in str(report)


@pytest.mark.parametrize("ending, cause", [
    ("import os\nos._exit(3)", "exit status 3"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "killed"),
    ("raise SystemExit(1)", None),  # an ordinary exception: the run goes on
])
def test_a_submission_that_ends_its_process(tmp_path, settings, solution, ending, cause):
    "A cell that ends the worker is skipped in a fresh worker: it costs only what depends on it."
    path = script(tmp_path, "jo_99_toy.py", *all_solutions(solution), ending)
    report = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings)
    assert report.total == 5, str(report)
    if cause is None:
        assert "SystemExit" in report.cell_errors[0]
    else:
        [error] = [e for e in report.cell_errors if e.startswith("cell 5:")]
        assert cause in error and "skipped" in error


def test_a_cell_that_ends_the_process_before_the_functions(tmp_path, settings, solution):
    path = script(tmp_path, "kay_99_toy.py", "import os\nos._exit(0)", *all_solutions(solution))
    report = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings)
    assert report.total == 5 and "cell 2:" in report.cell_errors[0] and "exit status 0" in report.cell_errors[0]


def test_arguments_changed_in_place_and_returned_objects_come_back(tmp_path, settings):
    "The stand-in behaves like a local call: in-place changes and `result is argument` are mirrored."
    from openllm_edu.session import SubmissionFunction, SubmissionSession
    cells = [{"label": "cell 1", "source": "def scale_(t, factor):\n    t *= factor\n    return t\n"
                                              "def fill(xs, d):\n    xs.append(len(xs))\n    d['k'] = 1\n"
                                              "def draw(g):\n    import torch\n    return torch.rand(2, generator=g)"}]
    session = SubmissionSession(cells, [], sandbox.Limits(memory_mb=2048), settings.grader)
    session.student_names = ["scale_", "fill", "draw"]
    try:
        session.start()
        assert sorted(session.defined["functions"]) == ["draw", "fill", "scale_"]
        scale_, fill, draw = (SubmissionFunction(session, n) for n in ("scale_", "fill", "draw"))
        t = torch.ones(3)
        assert scale_(t, 2.0) is t and t.tolist() == [2.0, 2.0, 2.0]
        xs, d = [5], {}
        assert fill(xs, d) is None and xs == [5, 1] and d == {"k": 1}
        mine, theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(draw(mine), torch.rand(2, generator=theirs))
        assert torch.equal(torch.rand(2, generator=mine), torch.rand(2, generator=theirs)), "generator state mirrored"
    finally:
        session.retire()


def test_in_submission_runs_the_recipe_locally_outside_the_grader():
    def recipe(fn, n):
        data = list(range(n))
        return fn(data), data
    assert in_submission(recipe, sum)(4) == (6, [0, 1, 2, 3])


def test_check_against_reference_names_a_known_mistake():
    import statistics
    with pytest.raises(AssertionError, match="hint:     that is what the sample variance gives"):
        check_against_reference(statistics.variance, statistics.pvariance, [([1.0, 2.0, 4.0],)], rtol=1e-9,
                                mistakes={"the sample variance": statistics.variance, "zero": lambda xs: 0.0})


def test_visible_asserts_say_what_differs(tmp_path, settings, solution):
    wrong = "def running_sum(xs):\n    return [sum(xs[:i]) for i in range(len(xs))]"
    path = script(tmp_path, "lou_99_toy.py", wrong, solution_code(solution, "softmax"), solution_code(solution, "histogram"))
    report = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings)
    assert feedback(report, "running_sum").startswith("running_sum([1, 2, 3]): result[0]: 1 expected, got 0")


def honest_with(solution, *extra) -> list[str]:
    return [*extra, *all_solutions(solution)]


def test_without_a_cgroup_memory_is_capped_by_rlimit_data(tmp_path, settings, solution, monkeypatch):
    "Reserving address space is fine (a CUDA build of torch does it), using too much memory is not."
    monkeypatch.setattr(sandbox.Cgroup, "create", classmethod(lambda cls, limits: None))
    cells = honest_with(solution, "import mmap\nreserved = mmap.mmap(-1, 20 * 2**30)", "hog = b'x' * (3 * 2**30)")
    report = grade(script(tmp_path, "max_99_toy.py", *cells), solutions_dir=FIXTURE / "solutions", settings=settings)
    assert report.total == 5 and "RLIMIT_DATA" in report.isolation
    assert len(report.cell_errors) == 1 and report.cell_errors[0].startswith("cell 3: MemoryError")


def cgroups_work() -> bool:
    group = sandbox.Cgroup.create(sandbox.Limits())
    if group is not None:
        group.destroy()
    return group is not None


@pytest.mark.skipif(not cgroups_work(), reason="no cgroup can be made here (needs root)")
def test_a_cgroup_caps_memory_without_capping_address_space(tmp_path, settings, solution):
    cells = honest_with(solution, "import mmap\nreserved = mmap.mmap(-1, 20 * 2**30)",
                        "import numpy\nlazy = numpy.zeros(5 * 2**30, dtype=numpy.uint8)  # calloc: not touched",
                        "hog = b'x' * (3 * 2**30)")
    # Touching 2 GiB takes seconds on a slow machine: give the cell time, so that only the memory limit can stop it.
    limits = dataclasses.replace(settings.grader, cell_timeout_seconds=60, timeout_seconds=120)
    report = grade(script(tmp_path, "max_99_toy.py", *cells), solutions_dir=FIXTURE / "solutions",
                   settings=dataclasses.replace(settings, grader=limits))
    assert report.total == 5 and "(cgroup)" in report.isolation, str(report)
    [error] = report.cell_errors
    assert error.startswith("cell 4: killed for using more than the memory limit (2048 MB)") and "skipped" in error


def test_not_isolated_grading_still_works_and_says_so(tmp_path, settings, solution):
    path = script(tmp_path, "ned_99_toy.py", *all_solutions(solution))
    report = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings, isolate=False)
    assert report.total == 5 and report.isolation.startswith("NOT ISOLATED")
    assert str(report).splitlines()[1].startswith("WARNING: NOT ISOLATED")


def test_private_tests_add_to_an_item(tmp_path, settings, solution):
    private = tmp_path / "private" / "99_toy"
    private.mkdir(parents=True)
    (private / "running_sum.py").write_text("assert running_sum([5]) == [6], 'private check'")
    path = script(tmp_path, "oz_99_toy.py", *all_solutions(solution))
    report = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings, private_tests=tmp_path / "private")
    assert points(report) == {"running_sum": 0, "softmax": 2, "histogram": 2}
    assert feedback(report, "running_sum") == "private check: result[0]: 6 expected, got 5"


def test_seeds_come_from_the_secret_and_the_file_name(tmp_path, settings, solution):
    from openllm_edu.submission import grading_seed
    path = script(tmp_path, "pat_99_toy.py", *all_solutions(solution))
    first = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings, secret="s1")
    again = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings, secret="s1")
    other = grade(path, solutions_dir=FIXTURE / "solutions", settings=settings, secret="s2")
    assert first.seed == again.seed == grading_seed("s1", "99_toy", "pat_99_toy.py") != other.seed
    assert not any("secret" in f for f in first.flags) and any("secret" in f for f in
                                                             grade(path, solutions_dir=FIXTURE / "solutions",
                                                                   settings=settings, secret="").flags)


# ---------------------------------------------------------------- the wire format

@pytest.mark.parametrize("value", [
    None, True, -3, 2**70, 1.5, float("inf"), "é\n", b"\x00", (1, (2,)), [[]], {(1, 2): {3}}, frozenset({1}),
    torch.arange(6).view(2, 3), torch.zeros(0, 2, dtype=torch.bfloat16), torch.tensor(True), torch.zeros(2, dtype=torch.uint16),
    np.arange(4, dtype=np.uint32).reshape(2, 2), np.float64(2.5), np.dtype("int16"), np.uint8, torch.float16,
    torch.Size([1, 2]), slice(None, 3),
])
def test_values_survive_the_wire(value):
    back = wire.unpack_message(*_split(wire.pack_message({"v": value})))["v"]
    assert type(back) is type(value)
    if isinstance(value, torch.Tensor):
        assert back.dtype == value.dtype and torch.equal(back, value)
    elif isinstance(value, np.ndarray):
        assert back.dtype == value.dtype and np.array_equal(back, value)
    else:
        assert back == value


def _split(frame: bytes) -> tuple[bytes, bytes]:
    import struct
    text_size, blob_size = struct.unpack("<IQ", frame[4:16])
    return frame[16:16 + text_size], frame[16 + text_size:16 + text_size + blob_size]


@pytest.mark.parametrize("data", [
    {"$dataclass": "subprocess:Popen", "fields": {"args": "true"}}, {"$dataclass": "openllm_edu.core:load_settings"},
    {"$tensor": "t0"}, {"$bytes": "%%%"}, {"$float": "1e308"}, {"$dtype": "load"}, {"$generator": "t0"},
    {"$tuple": 5}, {"$dict": [[1]]}, {"a": 1, "$set": []}, {"$npdtype": "O"},
])
def test_hostile_messages_are_rejected(data):
    import json as json_module
    with pytest.raises(wire.WireError):
        wire.unpack_message(json_module.dumps({"v": data}).encode(), b"")


def test_frames_are_checked_before_they_are_read():
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, wire.MAGIC + (2**31).to_bytes(4, "little") + (0).to_bytes(8, "little"))
        with pytest.raises(wire.WireError, match="larger than allowed"):
            wire.receive_message(read_end, deadline=time.monotonic() + 5)
        os.write(write_end, b"\x00" * 16)
        with pytest.raises(wire.WireError, match="instead of"):
            wire.receive_message(read_end, deadline=time.monotonic() + 5)
        with pytest.raises(TimeoutError):
            wire.receive_message(read_end, deadline=time.monotonic() + 0.2)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_unsendable_values_name_their_type():
    with pytest.raises(wire.WireError, match="torch.nn.modules.linear.Linear cannot be sent"):
        wire.pack_message({"v": torch.nn.Linear(2, 2)})


# ---------------------------------------------------------------- the real course

REAL_ASSIGNMENTS = sorted({"01_data", "02_tokenizer"} | {p.stem for p in (REPO / "solutions").glob("*.ipynb")})


@pytest.mark.parametrize("stem", REAL_ASSIGNMENTS)
def test_real_solutions_score_full_and_exercises_zero(stem, tmp_path):
    solution_path = REPO / "solutions" / f"{stem}.ipynb"
    assert solution_path.exists(), f"solutions/{stem}.ipynb is missing"
    settings = load_settings(REPO / "settings.ini")
    solutions = tmp_path / "solutions"  # a copy: the repository's files stay untouched whatever happens
    shutil.copytree(REPO / "solutions", solutions)
    exercise = tmp_path / f"{stem}.ipynb"
    exercise.write_bytes(exercises.render_exercise(solution_path, settings))
    full = grade(solutions / f"{stem}.ipynb", solutions_dir=solutions, settings=settings)
    assert full.total == full.max_total == sum(settings.exercise_points[stem].values()), str(full)
    assert not full.cell_errors, str(full)
    empty = grade(exercise, solutions_dir=solutions, settings=settings)
    assert empty.total == 0 and not empty.problem, str(empty)


@pytest.mark.parametrize("stem", REAL_ASSIGNMENTS)
def test_real_half_done_submission_scores_in_between(stem, tmp_path):
    "The last exercise left as released (later ones can build on earlier ones): only its points are lost."
    settings = load_settings(REPO / "settings.ini")
    solved = nbformat.read(REPO / "solutions" / f"{stem}.ipynb", as_version=4)
    released = nbformat.reads(exercises.render_exercise(REPO / "solutions" / f"{stem}.ipynb", settings).decode(),
                              as_version=4)
    last = max(i for i, c in enumerate(solved.cells) if exercises.nbgrader_of(c).get("solution"))
    solved.cells[last] = released.cells[last]
    submission = tmp_path / f"{stem}.ipynb"
    nbformat.write(solved, submission)
    report = grade(submission, solutions_dir=REPO / "solutions", settings=settings)
    lost = {item.grade_id for item in report.items if not item.passed}
    assert 0 < report.total < report.max_total, str(report)
    assert len(lost) == 1 and report.max_total - report.total == settings.exercise_points[stem][lost.pop()]


# A plausible wrong derivation of each chapter's experiment: it must lose that item's points, and only those.
WRONG_EXPERIMENTS = {
    "03_lm_basics": ("smoothing_sweep", """
def smoothing_sweep(train_ids, val_ids, vocab_size, alphas):
    counts = bigram_counts(train_ids + val_ids, vocab_size).double()  # counts the held-out text too
    pairs = torch.tensor(val_ids[:-1]), torch.tensor(val_ids[1:])
    return [-((counts + a) / (counts + a).sum(1, keepdim=True))[pairs].log().mean().item() for a in alphas]
"""),
    "04_attention": ("attention_entropy", """
def attention_entropy(q, k, scaled):
    scores = q.double() @ k.double().T / (q.shape[-1] if scaled else 1)  # 1/d instead of 1/sqrt(d)
    weights = torch.softmax(scores, dim=-1)
    return float(-torch.special.xlogy(weights, weights).sum(-1).mean())
"""),
    "05_gpt": ("residual_stream_std", """
def residual_stream_std(model, idx):
    with torch.no_grad():
        x = model.wte(idx)  # forgets the position embeddings
        stds = [x.std().item()]
        for block in model.blocks:
            x = block(x)
            stds.append(x.std().item())
    return stds
"""),
    "06_generation": ("repetition_experiment", """
def repetition_experiment(table, penalty, steps, generator):
    ids = [0]
    for _ in range(steps):
        logits = apply_repetition_penalty(table[ids[-1]], torch.tensor(ids[-1:]), penalty)  # the last token only
        ids.append(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).item())
    return ids, len(set(zip(ids, ids[1:]))) / steps
"""),
    "07_training": ("lr_sweep", """
def lr_sweep(train_fn, lrs):
    kept, diverged = [], []
    for lr in lrs:
        losses = train_fn(lr)
        (diverged if not math.isfinite(losses[-1]) or losses[-1] > losses[0] else kept).append(lr)
    return (max(kept) if kept else None), diverged  # the largest stable lr, not the one with the lowest loss
"""),
    "08_memory": ("saved_activation_bytes", """
def saved_activation_bytes(module, x):
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    sizes = []
    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters:
            sizes.append(t.untyped_storage().nbytes())  # a shared storage counted once per saved tensor
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(sizes)
"""),
    "09_distributed": ("data_parallel_gradient_gap", """
def data_parallel_gradient_gap(model, x, y, shard_sizes, weighted):
    params = list(model.parameters())
    full = torch.autograd.grad(F.mse_loss(model(x), y), params)
    parts = [torch.autograd.grad(F.mse_loss(model(a), b), params) for a, b in zip(x.split(shard_sizes), y.split(shard_sizes))]
    combined = [sum(g[i] for g in parts) / len(parts) for i in range(len(params))]  # never weighted
    return max((c - f).abs().max().item() for c, f in zip(combined, full))
"""),
    "10_scoring": ("shortest_pick_rate", """
def shortest_pick_rate(table, alphabet, items, normalize=None):
    hits = 0
    for context, choices in items:
        logprobs = []
        for choice in choices:
            ids = [alphabet.index(c) for c in choice]  # scored on its own: the context is never read
            logprobs.append(sum(table[a, b].item() for a, b in zip(ids, ids[1:])))
        picked = pick_choice(logprobs, [len(c) for c in choices], choices, normalize)
        hits += len(choices[picked]) == min(len(c) for c in choices)
    return hits / len(items)
"""),
    "11_chat": ("reply_loss", """
def reply_loss(train, test, vocab_size, masked, alpha=0.1):
    counts = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)
    for ids, mask in train:
        for t in range(len(ids) - 1):
            if mask[t] or not masked:  # the input's mask value, not the target's
                counts[ids[t], ids[t + 1]] += 1
    log_probs = ((counts + alpha) / (counts + alpha).sum(dim=1, keepdim=True)).log()
    losses = [-log_probs[ids[t], ids[t + 1]].item() for ids, mask in test for t in range(len(ids) - 1) if mask[t + 1]]
    return sum(losses) / len(losses)
"""),
    "12_lora": ("low_rank_fit", """
def low_rank_fit(delta, ranks):
    sigma = torch.linalg.svdvals(delta)
    return [(r * sum(delta.shape), (sigma[r:].sum() / sigma.sum()).item()) for r in ranks]  # the norm squares them
"""),
    "13_quantize": ("int4_group_errors", """
def int4_group_errors(w, group_sizes):
    errors = []
    for g in group_sizes:
        groups = w.reshape(w.shape[0], -1, g)
        scale = (groups.abs().amax(dim=-1, keepdim=True) / 8).clamp(min=torch.finfo(torch.float32).tiny)
        back = (torch.round(groups / scale).clamp(-8, 7) * scale).reshape(w.shape)  # 16 levels, -max not exact
        errors.append(((w - back).norm() / w.norm()).item())
    return errors
"""),
    "14_export": ("tanh_gelu_error", """
def tanh_gelu_error(model, idx):
    exact, tanh = copy.deepcopy(model).float(), copy.deepcopy(model).float()  # float32, as the export is usually run
    for block in tanh.blocks:
        block.mlp.gelu = torch.nn.GELU(approximate="tanh")
    with torch.no_grad():
        return (tanh(idx)[0] - exact(idx)[0]).abs().max().item()
"""),
    "15_batching": ("tokens_per_forward", """
def tokens_per_forward(model, prompts, new_tokens, max_batch):
    engine = Engine(model, eos_id=None, max_batch=max_batch)
    config = GenerationConfig(max_new_tokens=new_tokens, temperature=0)
    streams = [engine.submit(Request(ids, config)) for ids in prompts]
    steps = 0
    while engine.step():
        steps += 1  # counts steps: a step's prefills are forward passes too
    return sum(s.completion_tokens for s in streams), steps
"""),
    "16_multilingual": ("english_tax", """
def english_tax(documents, vocab_size):
    english = FastBPETokenizer().train([d for d in documents if document_language(d) == "en"], vocab_size)
    mixed = FastBPETokenizer().train(list(documents), vocab_size)
    costs = {}
    for language in dict.fromkeys(document_language(d) for d in documents):
        docs = [d for d in documents if document_language(d) == language]
        chars = sum(len(d) for d in docs)  # per character, not per UTF-8 byte
        english_cost, mixed_cost = (sum(len(t.encode(d)) for d in docs) / chars for t in (english, mixed))
        costs[language] = {"english": english_cost, "mixed": mixed_cost, "tax": english_cost / mixed_cost}
    return costs
"""),
}


@pytest.mark.parametrize("stem", sorted(WRONG_EXPERIMENTS))
def test_real_wrong_experiment_loses_its_points(stem, tmp_path):
    grade_id, wrong_code = WRONG_EXPERIMENTS[stem]
    settings = load_settings(REPO / "settings.ini")
    submission = nbformat.read(REPO / "solutions" / f"{stem}.ipynb", as_version=4)
    answer = next(c for c in submission.cells if exercises.nbgrader_of(c).get("grade_id") == f"{grade_id}_code")
    answer.source = wrong_code.strip()
    path = tmp_path / f"{stem}.ipynb"
    nbformat.write(submission, path)
    report = grade(path, solutions_dir=REPO / "solutions", settings=settings)
    lost = {item.grade_id for item in report.items if not item.passed}
    assert lost == {grade_id}, str(report)
    assert report.max_total - report.total == settings.exercise_points[stem][grade_id], str(report)


@pytest.mark.skipif(shutil.which("bwrap") is None or os.geteuid() != 0,
                    reason="bubblewrap is not installed, or the tests do not run as root (see the README)")
def test_bubblewrap_confines_when_it_is_installed():
    "As root with bubblewrap installed, grading must be isolated: a silent fallback would hide a broken sandbox."
    command, how = sandbox.isolation()
    assert command is not None, how
    assert how.startswith("isolated") and "uid 65534" in how
