"""The command line: exit statuses, one clear line on stderr, no output file on failure, input untouched."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import chain_model, run_model
from dfmpc_onnx.cli import main


def run_cli(*args):
    """The command with pink-noise refinement, which the base install uses, so runs do not depend on PyTorch."""
    fixed = [] if "--synthetic" in args else ["--synthetic", "pink"]
    return subprocess.run([sys.executable, "-m", "dfmpc_onnx", *map(str, args), *fixed], capture_output=True, text=True)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(chain_model(), path)
    return path


def assert_refused(result, out: Path, pattern: str, status: int = 2):
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert pattern in lines[0], lines[0]
    assert not out.exists()
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_success_prints_table_and_summary(model_path, tmp_path):
    out = tmp_path / "out.onnx"
    before = model_path.read_bytes()
    result = run_cli(model_path, out, "--scheme", "2/6", "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert "pairs found: 2" in result.stdout and "onnxruntime check" in result.stdout
    assert "conv0" in result.stdout and "low" in result.stdout
    assert out.exists() and model_path.read_bytes() == before
    assert '"pairs"' in (tmp_path / "r.json").read_text()


def test_python_api_entry_point_matches(model_path, tmp_path, capsys):
    assert main([str(model_path), str(tmp_path / "o.onnx"), "-q", "--no-check", "--synthetic", "pink"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("content,pattern", [
    (b"", "empty"),
    (os.urandom(64), "not an ONNX model"),
    (b"\x08\x07", "no graph"),
])
def test_unreadable_inputs(tmp_path, content, pattern):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    out = tmp_path / "out.onnx"
    assert_refused(run_cli(bad, out), out, pattern)


def test_truncated_model(model_path, tmp_path):
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(model_path.read_bytes()[:200])
    out = tmp_path / "out.onnx"
    result = run_cli(bad, out)
    assert_refused(result, out, "not an ONNX model")


def test_missing_input(tmp_path):
    out = tmp_path / "out.onnx"
    assert_refused(run_cli(tmp_path / "nope.onnx", out), out, "no such file")


def test_output_equal_to_input(model_path):
    before = model_path.read_bytes()
    result = run_cli(model_path, model_path)
    assert result.returncode == 2 and "is the input file" in result.stderr
    assert model_path.read_bytes() == before


def test_output_in_missing_folder(model_path, tmp_path):
    out = tmp_path / "missing" / "out.onnx"
    assert_refused(run_cli(model_path, out), out, "does not exist")


def test_output_in_read_only_folder(model_path, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if os.geteuid() == 0:  # root writes into read-only folders: the operating system's refusal, simulated
        import tempfile

        def refuse(*args, dir=None, **kwargs):
            if Path(dir) == folder:
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kwargs)
        real = tempfile.TemporaryFile
        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    out = folder / "out.onnx"
    assert main([str(model_path), str(out), "--synthetic", "pink"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not writable" in lines[0], lines
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc, where nobody can create files")
def test_output_in_folder_that_refuses_files(model_path):
    out = Path("/proc/dfmpc-test-out.onnx")
    result = run_cli(model_path, out)
    assert result.returncode == 2 and "not writable" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_nan_weights(tmp_path):
    model = chain_model()
    tensor = model.graph.initializer[0]
    values = numpy_helper.to_array(tensor).copy()
    values.flat[0] = np.nan
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    bad = tmp_path / "nan.onnx"
    onnx.save(model, bad)
    out = tmp_path / "out.onnx"
    assert_refused(run_cli(bad, out), out, "NaN or Inf")


def test_dangling_input(tmp_path):
    model = chain_model()
    model.graph.node[3].input[0] = "nowhere"
    bad = tmp_path / "dangling.onnx"
    onnx.save(model, bad)
    out = tmp_path / "out.onnx"
    assert_refused(run_cli(bad, out), out, "not a valid ONNX model")


def test_unsupported_opset(tmp_path):
    model = chain_model()
    model.opset_import[0].version = 5
    bad = tmp_path / "old.onnx"
    onnx.save(model, bad)
    out = tmp_path / "out.onnx"
    assert_refused(run_cli(bad, out), out, "opset 5 is not supported")


def test_external_data_outside_folder(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    model = chain_model()
    onnx.save(model, inner / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    moved = onnx.load(inner / "m.onnx", load_external_data=False)
    for tensor in moved.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    onnx.save(moved, inner / "m.onnx")
    (inner / "w.bin").rename(tmp_path / "w.bin")
    out = tmp_path / "out.onnx"
    assert_refused(run_cli(inner / "m.onnx", out), out, "outside the model's folder")


def test_external_data_missing(tmp_path):
    model = chain_model()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    (tmp_path / "w.bin").unlink()
    out = tmp_path / "out.onnx"
    assert_refused(run_cli(tmp_path / "m.onnx", out), out, "missing")


def test_external_data_inside_folder_loads(tmp_path):
    onnx.save(chain_model(), tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    result = run_cli(tmp_path / "m.onnx", tmp_path / "out.onnx", "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args,pattern", [
    (["--scheme", "6/2"], "LOW <= HIGH"),
    (["--scheme", "two"], "not LOW/HIGH"),
    (["--lambda1", "-1"], "non-negative"),
    (["--exclude", "no_such_node"], "no Conv, Gemm or MatMul"),
    (["--placement", "consumer"], "needs --format float"),
    (["--providers", "nonexistent"], "not available"),
    (["--protect", "abc"], "--protect: 'abc' is not a number"),
    (["--scale-block", "1"], "--scale-block takes"),
    (["--target-bits", "x"], "--target-bits: 'x' is not a valid value"),
    (["--input-shape", "a:b"], "--input-shape: 'a:b'"),
])
def test_bad_options(model_path, tmp_path, args, pattern):
    out = tmp_path / "out.onnx"
    assert_refused(run_cli(model_path, out, *args), out, pattern)


def test_non_constant_weight_is_left_float(tmp_path):
    model = chain_model()
    name = model.graph.node[0].input[1]
    tensor = next(t for t in model.graph.initializer if t.name == name)
    model.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    model.graph.initializer.remove(tensor)
    path = tmp_path / "weight_input.onnx"
    onnx.save(model, path)
    result = run_cli(path, tmp_path / "out.onnx")
    assert result.returncode == 0, result.stderr
    assert "left float: stem: weight 'stem.w' is not a constant" in result.stdout
    assert "refinement skipped: it needs a model with one input, this one has 2" in result.stdout


def test_no_pair_quantizes_everything_high(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(chain_model(n_convs=1), path)
    result = run_cli(path, tmp_path / "out.onnx", "--keep-first", "--keep-last")
    assert result.returncode == 0, result.stderr
    assert "pairs found: 0" in result.stdout and "no quantizable pair" in result.stdout


def test_same_input_same_output_bytes(model_path, tmp_path):
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert run_cli(model_path, first).returncode == 0
    assert run_cli(model_path, second).returncode == 0
    assert first.read_bytes() == second.read_bytes()


def test_external_data_output_is_deterministic_and_loads(tmp_path):
    model_path = tmp_path / "in.onnx"
    onnx.save(chain_model(channels=64), model_path)
    outputs = []
    for name in ("a.onnx", "b.onnx"):
        out = tmp_path / name
        result = run_cli(model_path, out, "--external-data")
        assert result.returncode == 0 and f"{name}.data" in result.stdout, result.stderr
        model_bytes = out.read_bytes().replace(f"{name}.data".encode(), b"OUT.data")
        outputs.append((model_bytes, (tmp_path / f"{name}.data").read_bytes()))
        run_model(onnx.load(str(out)), np.zeros((1, 3, 8, 8), np.float32))
    assert outputs[0] == outputs[1]


def test_external_data_never_replaces_the_inputs_data(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save_model(chain_model(channels=64), folder / "in.onnx", save_as_external_data=True,
                    location="out.onnx.data", size_threshold=0)
    before = (folder / "out.onnx.data").read_bytes()
    out = folder / "out.onnx"
    assert_refused(run_cli(folder / "in.onnx", out, "--external-data"), out, "belongs to the input")
    assert (folder / "out.onnx.data").read_bytes() == before


def test_automatic_external_data_above_the_protobuf_limit(monkeypatch, tmp_path):
    import dfmpc_onnx.save as save
    monkeypatch.setattr(save, "PROTOBUF_LIMIT", 1000)
    out = tmp_path / "out.onnx"
    assert save.save_model_atomic(chain_model(), out) is True
    assert (tmp_path / "out.onnx.data").exists() and onnx.load(str(out)).graph.initializer
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_keep_failed_writes_the_failing_model(model_path, tmp_path, monkeypatch):
    import dfmpc_onnx.api as api
    import dfmpc_onnx.check as check
    from dfmpc_onnx.errors import CheckError

    def failing_comparison(*args, **kwargs):
        raise CheckError("simulated check failure")
    monkeypatch.setattr(check, "_compare", failing_comparison)
    out = tmp_path / "out.onnx"
    with pytest.raises(CheckError):
        api.quantize_file(model_path, out, synthetic="pink")
    assert not out.exists()
    with pytest.raises(CheckError):
        api.quantize_file(model_path, out, synthetic="pink", keep_failed=True)
    assert out.exists()
