"""Every corpus case: the promised exit status and message, the inputs untouched, no output on failure."""

from __future__ import annotations

import re
from pathlib import Path

import onnxruntime as ort
import pytest

from corpus import CASES, Case
from dfmpc_onnx.cli import main


def _snapshot(folder: Path, skip: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not p.is_symlink() and p != skip and not p.name.startswith("out.onnx")}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_corpus_case(case: Case, tmp_path: Path, capsys):
    args = case.make(tmp_path)
    out = Path(args[1])
    out_existed = out.exists() or out.is_symlink()
    before = _snapshot(tmp_path, out)
    status = main(args[:2] + ["--synthetic", "pink", "--samples", "8"] + args[2:])
    captured = capsys.readouterr()
    assert status == case.status, captured.err
    assert "Traceback" not in captured.err
    assert _snapshot(tmp_path, out) == before, "an input file changed"
    leftovers = [p.name for p in out.parent.glob(f".{out.name}*")] if out.parent.is_dir() else []
    assert not leftovers, leftovers
    if case.status != 0:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and re.search(case.pattern, lines[0]), captured.err
        assert out_existed or not out.exists()
        return
    assert re.search(case.pattern, captured.out), captured.out
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
