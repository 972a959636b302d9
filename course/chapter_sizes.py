"""The size of each chapter, measured from its notebook, and the study time the syllabus derives from it.

    python course/chapter_sizes.py

One rule for every chapter, so the times in course/syllabus.md are comparable and can be checked:
prose is read at READ_WORDS_PER_MINUTE, code is read, run and changed at CODE_LINES_PER_MINUTE, and each exercise
point (settings.ini [exercises.*]) takes MINUTES_PER_POINT. The rates are assumptions stated once, not measurements
of students; the sizes are measured.
"""
import configparser
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READ_WORDS_PER_MINUTE = 100  # careful reading of technical prose
CODE_LINES_PER_MINUTE = 8  # reading a line of code, running its cell, looking at the output
MINUTES_PER_POINT = 8  # writing, testing and grading one point of an exercise


def notebook_size(path: Path) -> tuple[int, int]:
    "(words of prose, non-blank non-comment lines of code) in a notebook."
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    text = {kind: ["".join(c["source"]) for c in cells if c["cell_type"] == kind] for kind in ("markdown", "code")}
    words = sum(len(re.findall(r"[\w']+", t)) for t in text["markdown"])
    code = sum(1 for t in text["code"] for line in t.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    return words, code


def study_minutes(words: int, code: int, points: int) -> int:
    return round(words / READ_WORDS_PER_MINUTE + code / CODE_LINES_PER_MINUTE + points * MINUTES_PER_POINT)


def as_time(minutes: int) -> str:
    "Rounded to 15 minutes: 20 min, 45 min, 1.5 h, 2.25 h."
    quarter = max(1, round(minutes / 15)) * 15
    return f"{quarter} min" if quarter < 60 else f"{quarter / 60:g} h"


def companion_notebooks(stem: str, chapters) -> list[str]:
    """Notebooks that are part of chapter `stem` without exporting a module of their own, so without a line in
    [chapters]: 05b_ablations belongs to 05_gpt."""
    number = re.match(r"\d+", stem).group()
    found = sorted(path.stem for path in (ROOT / "nbs").glob(f"{number}[a-z]_*.ipynb"))
    return [name for name in found if name not in chapters]


def chapter_rows() -> list[tuple[str, int, int, int, str]]:
    settings = configparser.ConfigParser()
    settings.read(ROOT / "settings.ini", encoding="utf-8")
    rows = []
    for stem in settings["chapters"]:
        if int(re.match(r"\d+", stem).group()) >= 90:  # tools for instructors and users, not chapters
            continue
        for name in [stem, *companion_notebooks(stem, settings["chapters"])]:
            words, code = notebook_size(ROOT / "nbs" / f"{name}.ipynb")
            section = f"exercises.{name}"
            points = sum(int(v) for v in settings[section].values()) if settings.has_section(section) else 0
            rows.append((name, words, code, points, as_time(study_minutes(words, code, points))))
    return rows


if __name__ == "__main__":
    print(f"{'notebook':<18} {'words':>6} {'code lines':>10} {'points':>6}  study time")
    for stem, words, code, points, time in chapter_rows():
        print(f"{stem:<18} {words:>6,} {code:>10,} {points:>6}  {time}")
