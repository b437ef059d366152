"""Progress stays readable in a file: plain whole lines instead of a bar drawn only when it is finished."""

import io
import subprocess
import sys

from personavec import progress


def test_plain_line_fields():
    assert progress.plain_progress_line("judging", 25, 100, 30.0) == \
        "judging: 25/100 (25%) elapsed 0:00:30, eta 0:01:30"
    assert progress.plain_progress_line("judging", 0, 100, 0.0) == "judging: 0/100 (0%) elapsed 0:00:00, eta -"
    assert progress.plain_progress_line("gen", 100, 100, 3725.0, "L12") == "gen: 100/100 (100%) elapsed 1:02:05, eta - L12"


def test_plain_progress_prints_start_each_tenth_and_end():
    now = [0.0]
    stream = io.StringIO()
    with progress._plain_progress("capture", 20, stream=stream, clock=lambda: now[0]) as advance:
        for _ in range(20):
            now[0] += 10.0  # slower than PLAIN_EVERY_S per step: every new tenth is printed
            advance(1)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "capture: 0/20 (0%) elapsed 0:00:00, eta -"
    assert lines[-1] == "capture: 20/20 (100%) elapsed 0:03:20, eta -"
    assert len(lines) == 1 + 9 + 1  # start, tenths 1..9, end
    assert "capture: 2/20 (10%) elapsed 0:00:20, eta 0:03:00" in lines


def test_plain_progress_is_rate_limited():
    now = [0.0]
    stream = io.StringIO()
    with progress._plain_progress("fast", 1000, stream=stream, clock=lambda: now[0]) as advance:
        for _ in range(1000):
            now[0] += 0.001
            advance()
    assert len(stream.getvalue().splitlines()) == 2  # start and end only


def test_progress_bar_to_a_file_writes_whole_lines(tmp_path):
    log = tmp_path / "err.txt"
    code = ("from personavec.progress import progress_bar\n"
            "with progress_bar('judging', total=3) as advance:\n"
            "    advance(1); advance(2)\n")
    with log.open("w") as err:
        subprocess.run([sys.executable, "-c", code], stderr=err, check=True)
    text = log.read_text()
    assert "\x1b[" not in text and "\r" not in text  # no terminal control codes in a log
    assert text.splitlines()[0].startswith("judging: 0/3 (0%)")
    assert text.splitlines()[-1].startswith("judging: 3/3 (100%)")
