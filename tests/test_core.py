"""Settings parsing and atomic writes (openllm_edu.core, chapter 00)."""
import errno
import os
from pathlib import Path

import pytest

from openllm_edu.core import CourseError, SettingsError, atomic_open, atomic_write_text, get_profile, load_settings

ROOT = Path(__file__).resolve().parent.parent
GOOD = (ROOT / "settings.ini").read_text()


def _settings_with(tmp_path, old, new):
    assert old in GOOD, f"test fixture out of date: {old!r} not in settings.ini"
    path = tmp_path / "settings.ini"
    path.write_text(GOOD.replace(old, new, 1))
    return path


def test_repository_settings_load():
    settings = load_settings(ROOT / "settings.ini")
    assert list(settings.chapters)[0] == "00_setup"
    assert settings.profiles["ci"].vocab_size == int(GOOD.split("[profile.ci]")[1].split("vocab_size = ")[1].split()[0])
    assert settings.exercise_points["02_tokenizer"]["train_bpe"] > 0


@pytest.mark.parametrize("old, new, names", [
    ("vocab_size = 512", "vocab_size = lots", ["[profile.ci]", "vocab_size", "lots"]),
    ("block_size = 64", "block_size = -1", ["[profile.ci]", "block_size", "negative"]),
    ("val_fraction = 0.1", "val_fraction = 1.5", ["[profile.ci]", "val_fraction"]),
    ("tokenizer = bpe", "tokenizer = words", ["[profile.ci]", "tokenizer", "words"]),
    ("memory_limit_mb = 4096", "", ["[grader]", "memory_limit_mb", "missing"]),
    ("[grader]", "[graders]", ["[grader]", "missing"]),
    ("default_profile = laptop", "default_profile = cluster", ["default_profile", "cluster"]),
    ("dedupe_documents = 2", "dedupe_documents = two", ["[exercises.01_data]", "dedupe_documents"]),
    ("[course]", "[course", ["cannot be parsed"]),
])
def test_malformed_settings_name_section_and_key(tmp_path, old, new, names):
    with pytest.raises(SettingsError) as error:
        load_settings(_settings_with(tmp_path, old, new))
    for name in names:
        assert name in str(error.value)


def test_settings_file_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENLLM_EDU_SETTINGS", str(_settings_with(tmp_path, "vocab_size = 512", "vocab_size = 777")))
    assert get_profile("ci").vocab_size == 777
    monkeypatch.setenv("OPENLLM_EDU_SETTINGS", str(tmp_path / "missing.ini"))
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings()


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("OPENLLM_EDU_PROFILE", "gpu")
    assert get_profile().name == "gpu"
    monkeypatch.setenv("OPENLLM_EDU_PROFILE", "cluster")
    with pytest.raises(CourseError, match="unknown profile 'cluster'"):
        get_profile()


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = atomic_write_text(tmp_path / "state.json", "old")

    def interrupted_rename(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"], "the temporary file must be removed"


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = atomic_write_text(tmp_path / "metrics.json", "old")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CourseError, match=r"disk is full while writing .*metrics\.json; free some space"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_open_streams_and_replaces_in_one_step(tmp_path):
    target = tmp_path / "sub" / "tokens.txt"
    with atomic_open(target, "w") as f:
        for i in range(3):
            f.write(f"{i}\n")
        assert not target.exists(), "the name appears only when the file is complete"
    assert target.read_text() == "0\n1\n2\n" and sorted(p.name for p in target.parent.iterdir()) == ["tokens.txt"]
