"""The ways the tool refuses to hand back a model, and their exit statuses."""


class InputError(Exception):
    """The input model, an option or the output path cannot be used (exit status 2)."""

    exit_status = 2


class CheckError(Exception):
    """The quantized model failed to load or run in onnxruntime (exit status 3).

    ``model`` holds the failing model where there is one (for ``--keep-failed``).
    """

    exit_status = 3
    model = None


class InternalError(Exception):
    """A bug in this tool, e.g. onnxruntime refusing a graph the tool built for itself (exit status 1)."""

    exit_status = 1


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, for one-line error reports."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:limit]
