"""bench/read_cost.py at toy size: every layer row and every goal row is printed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))

import read_cost  # noqa: E402


def test_toy_run_prints_every_row():
    text = read_cost.main(["--chapter-size", "16", "--hidden", "32", "--batch", "2", "--seq", "8", "--repeats", "1",
                           "--decode-calls", "2", "--rows", "small,chapters,token,million,dense,dense_chapters",
                           "--mapped-chapters", "8"])
    lines = text.splitlines()
    for row in read_cost.ROWS[:6]:
        assert any(line.startswith(f"| {read_cost.slots_label(row, _args())}")
                   for line in lines), row.key
    goals = [line for line in lines if line.endswith(("| <= 1.3 |", "| <= 1.1 |", "| <= 150 µs |", "| >= 0.9 |",
                                                      "| grows with the chapters read |"))]
    assert len(goals) == 6
    assert any(line.startswith("| 128 slots int8, memory-mapped") for line in lines)
    assert "| 1,024 chapters ÷ 1 chapter, training step with AdamW | 1.66 | " in text
    assert " - |" not in text.split("| measure |")[1].split("generation")[0]  # every ratio row measured


def _args():
    return read_cost.parse(["--chapter-size", "16"])
