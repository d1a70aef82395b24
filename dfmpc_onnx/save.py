"""The save stage: the rewritten graph assembled into a model, and files written atomically (the
input is never touched; on any failure nothing is left behind)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import onnx
import onnx_graphsurgeon as gs

from .errors import InputError
from .load import external_data_files
from .precision import to_float16
from .report import initializer_bytes
from .runtime import PROTOBUF_LIMIT, loadable_ir_version


def assemble_model(graph: gs.Graph, original: onnx.ModelProto, half: bool = False) -> onnx.ModelProto:
    """The rewritten graph as a model with the original's opsets and metadata and an IR version onnxruntime
    reads; in float16 again when ``half`` (``precision.py``)."""
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    del model.graph.value_info[:]
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    model.ir_version = loadable_ir_version(model, original.ir_version)
    model.producer_name = "dfmpc-onnx"
    model.doc_string = original.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    return to_float16(model) if half else model


def external_data_path(destination: Path) -> Path:
    """Where ``save_model_atomic`` puts the weights of a model saved with external data."""
    return destination.with_name(destination.name + ".data")


def check_output_path(source: Path, destination: Path) -> None:
    """Refuse an output that is the input, a folder, or in a folder that is missing or not writable."""
    if destination.exists() and source.exists() and os.path.samefile(source, destination):
        raise InputError(f"{destination}: output path is the input file; choose another name")
    if destination.is_dir():
        raise InputError(f"{destination}: output path is a folder")
    data = external_data_path(destination)
    if data.exists() and source.exists() and (os.path.samefile(source, data) or _uses_file(source, data)):
        raise InputError(f"{destination}: its external data file {data.name} belongs to the input; choose another name")
    _check_folder_writable(destination, "output")


def _check_folder_writable(path: Path, what: str) -> None:
    folder = path.resolve().parent
    if not folder.is_dir():
        raise InputError(f"{path}: {what} folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise InputError(f"{path}: {what} folder {folder} is not writable ({err.strerror})") from None


def _uses_file(model_path: Path, data: Path) -> bool:
    """Whether the model at ``model_path`` keeps external data in the file ``data``."""
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # an unreadable input is refused, with its reason, when it is loaded
        return False
    return data.resolve() in external_data_files(model, model_path.resolve().parent)


def save_model_atomic(model: onnx.ModelProto, destination: str | os.PathLike,
                      external_data: bool | None = None) -> bool:
    """Write ``model`` to temporary files in the destination folder, then rename them into place
    (``staged_model``). Returns whether external data was written."""
    with staged_model(model, Path(destination), external_data) as staged:
        return staged.external


class StagedModel:
    """A model written into a temporary folder beside its destination, not yet in place."""

    def __init__(self, workdir: Path, destination: Path, external: bool):
        self.workdir, self.destination, self.external = workdir, destination, external


@contextlib.contextmanager
def staged_model(model: onnx.ModelProto, destination: Path, external_data: bool | None) -> Iterator[StagedModel]:
    """Write ``model`` into a temporary folder beside ``destination``; when the ``with`` block ends without
    an error, rename it into place (the data file first), else leave nothing behind.

    With external data (``external_data`` True, or None and the model over protobuf's 2 GiB limit) the
    weights go to DESTINATION.data; ``external`` says whether any did."""
    folder = destination.resolve().parent
    # the weights' bytes, not ByteSize(): that walks the whole message, as long as serializing it
    external = external_data if external_data is not None else initializer_bytes(model) >= PROTOBUF_LIMIT - (64 << 20)
    try:
        workdir = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=folder))
    except OSError as err:
        raise InputError(f"{destination}: cannot write: {err.strerror}") from None
    data = external_data_path(destination)
    try:
        staged = workdir / destination.name
        try:
            if external:
                onnx.save_model(model, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data.name, size_threshold=1024)
                external = (workdir / data.name).exists()  # False when no tensor reached the 1 KiB threshold
            else:
                with open(staged, "wb") as stream:
                    stream.write(model.SerializeToString())
        except OSError as err:
            raise InputError(f"{destination}: cannot write: {err.strerror}") from None
        yield StagedModel(workdir, destination, external)
        try:
            if external:
                os.replace(workdir / data.name, data)
            os.replace(staged, destination)
        except OSError as err:
            raise InputError(f"{destination}: cannot write: {err.strerror}") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def check_report_path(report: Path, source: Path, destination: Path) -> None:
    """Refuse a report path that is the input or the output, a folder, or in a missing or unwritable folder."""
    for other, what in ((source, "input"), (destination, "output")):
        if report.resolve() == other.resolve() or (report.exists() and other.exists() and os.path.samefile(report, other)):
            raise InputError(f"{report}: report path is the {what} file; choose another name")
    if report.is_dir():
        raise InputError(f"{report}: report path is a folder")
    _check_folder_writable(report, "report")


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file beside it, renamed into place."""
    try:
        handle, temporary = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise InputError(f"{path}: cannot write: {err.strerror}") from None
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except OSError as err:
        Path(temporary).unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write: {err.strerror}") from None
