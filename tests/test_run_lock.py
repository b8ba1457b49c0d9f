"""A run directory's record of its settings (`run.json`) and its writers' locks (`run*.lock`)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from reflectionflow.search.errors import SetupError
from reflectionflow.search.run_dir import record_run, run_lock


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def lock(path, pid: int, host: str | None = None) -> None:
    """A lock file of an unsharded writer, as `run_lock` writes it."""
    holder = {"host": host or socket.gethostname(), "pid": pid, "started": "2026-01-02T03:04:05+0000"}
    path.write_text(json.dumps(holder | {"shard": [0, 1]}))


def test_a_dead_writers_lock_is_taken_over_with_a_warning_and_released_at_the_end(tmp_path, caplog):
    pid = dead_pid()
    lock(tmp_path / "run.lock", pid)
    with caplog.at_level(logging.WARNING), run_lock(tmp_path) as path:
        held = json.loads(path.read_text())
    assert f"its holder (pid {pid} on {socket.gethostname()}" in caplog.text
    assert (held["pid"], held["host"], held["shard"]) == (os.getpid(), socket.gethostname(), [0, 1])
    assert not path.exists()


def test_a_live_or_unknown_writer_is_refused(tmp_path):
    lock(tmp_path / "run.lock", os.getppid(), host="elsewhere")  # another machine: cannot tell, refused
    with pytest.raises(SetupError, match=f"written by pid {os.getppid()} on elsewhere since 2026-01-02"):
        with run_lock(tmp_path):
            pass
    (tmp_path / "run.lock").write_text("{not json")
    with pytest.raises(SetupError, match="written by an unreadable lock"):
        with run_lock(tmp_path):
            pass


def test_shards_of_one_count_write_together_overlapping_writers_are_refused(tmp_path):
    with run_lock(tmp_path, 0, 2), run_lock(tmp_path, 1, 4), run_lock(tmp_path, 3, 4):  # disjoint prompts
        assert sorted(p.name for p in tmp_path.glob("*.lock")) == [
            "run.shard-00000-of-00002.lock",
            "run.shard-00001-of-00004.lock",
            "run.shard-00003-of-00004.lock",
        ]
        for shard in ((0, 1), (0, 2), (2, 4)):  # all prompts; the same shard; prompts 2, 6, ... of shard 0/2
            with pytest.raises(SetupError, match="run.shard-00000-of-00002.lock"):
                with run_lock(tmp_path, *shard):
                    pass
    assert not list(tmp_path.glob("*.lock"))


def test_a_record_no_prompt_was_made_with_is_replaced(tmp_path):
    record_run(tmp_path, {"search": {"width": 2}})
    record_run(tmp_path, {"search": {"width": 2}})  # a resume with the same settings
    record_run(tmp_path, {"search": {"width": 4}})  # the first start failed before any prompt: fixed
    (tmp_path / "00000").mkdir()
    with pytest.raises(SetupError, match=r"other settings \(run.json differs in search.width\)"):
        record_run(tmp_path, {"search": {"width": 2}})
    assert json.loads((tmp_path / "run.json").read_text()) == {"search": {"width": 4}}
