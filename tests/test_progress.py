"""Progress: a bar with a time estimate on a terminal, a plain line every tenth elsewhere, nothing when quiet."""

import io

from dfmpc_onnx.progress import Console


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_every_tenth_and_at_the_end():
    stream = io.StringIO()
    progress = Console(stream).progress("refine", 25, "convs")
    for _ in range(25):
        progress.advance()
    lines = stream.getvalue().splitlines()
    assert lines == [f"refine: {n}/25 convs" for n in (2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25)]


def test_a_terminal_gets_one_redrawn_line_with_an_estimate():
    stream = Terminal()
    progress = Console(stream).progress("distill", 4, "steps")
    for _ in range(4):
        progress.advance("loss 0.1")
    text = stream.getvalue()
    assert text.count("\r") == 4 and text.count("\n") == 1 and text.endswith("\n")
    assert "distill: 2/4 steps, loss 0.1 [############------------]" in text and "left" in text


def test_quiet_prints_nothing(capsys):
    progress = Console().progress("target bits", 3, "units")
    for _ in range(3):
        progress.advance()
    Console().say("hello")
    assert capsys.readouterr() == ("", "")
