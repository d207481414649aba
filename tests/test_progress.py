"""Sweep progress lines: what the trainer writes and the scheduler prints."""

from __future__ import annotations

import io

from orchestrator.progress import ProgressBoard, ProgressFile, line, read


def test_progress_file_and_line(tmp_path):
    p = ProgressFile(tmp_path, 400)
    p.update(1)
    p.update(2)  # within a second of the first write: not written again
    assert read(tmp_path)["step"] == 1
    p.update(100, eval_accuracy=0.5)  # an evaluation is always written
    got = read(tmp_path)
    assert got["step"] == 100 and got["eval_accuracy"] == 0.5 and got["total"] == 400
    text = line("demo_effopd_s0", got)
    assert text.startswith("  demo_effopd_s0: step 100/400 (25%)  eval acc 0.500") and "ETA" in text
    assert line("t", None) == "  t: starting"


def test_board_prints_plain_lines_when_not_a_terminal(tmp_path):
    out = io.StringIO()
    board = ProgressBoard(out)
    ProgressFile(tmp_path, 10).update(3, eval_accuracy=0.25)
    board.message("trials: 0 done, 1 running")
    board.show({"a": tmp_path})
    board.show({"a": tmp_path})  # nothing new: not repeated
    lines = out.getvalue().splitlines()
    assert lines == ["trials: 0 done, 1 running", "  a: step 3/10 (30%)  eval acc 0.250"]
    assert "\x1b[" not in out.getvalue()
