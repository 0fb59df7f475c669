"""The demo model as the Makefile names it (MODEL_ARGS), which `make gpu-bundle` bundles."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def model_args() -> str:
    """The Makefile's MODEL_ARGS, checked to be what its gpu-bundle target passes as --demo-args."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    assert '--demo-args "$(MODEL_ARGS)"' in text
    return " ".join(re.search(r"^MODEL_ARGS \?=(.*)$", text, re.M).group(1).split())
