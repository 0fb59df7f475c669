"""The one way an ONNX file is read: loaded, checked, and a bad file turned into a user error."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError, first_line

# What to do about a missing or broken ONNX file, whichever step found it.
_FIX = "re-run `pipeline export` or pass another --onnx"


def load_onnx(path: Path):
    """The checked onnx.ModelProto of ``path``; PipelineError if it is missing or not a model."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"ONNX model '{path}' does not exist; {_FIX}")
    try:
        model = onnx.load(str(path))
        # An empty or truncated file can parse as an empty ModelProto; the checker catches it.
        onnx.checker.check_model(model)
    except Exception as exc:  # DecodeError, ValidationError, OSError: all mean "bad file"
        raise PipelineError(f"'{path}' is not a valid ONNX model: {first_line(exc)[:200]}; {_FIX}") from None
    return model
