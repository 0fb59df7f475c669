"""What a pass tells whoever runs the pipeline travels on the module it returns, not through
a dict or report object the pass closed over: an attribute of the IRModule under
``pipeline.result.<name>``, holding JSON text (as weight_params.PARAM_TRANSFORMS_ATTR and
split_k's PARTIAL_SUM_ATTR carry what a later pass or compile needs).

The int8 lowering says what it lowered ("int8"), the schedule phase where each kernel's
schedule came from ("schedule"). ``take_results`` reads them off after each phase and
removes them, so no later pass and no artifact sees them: the module a phase hands on is the
one it would be without them. A pass run on its own (a test) is read the same way.
"""

from __future__ import annotations

import json
from typing import Any

import tvm

RESULT_PREFIX = "pipeline.result."


def with_result(mod: tvm.IRModule, name: str, value: Any) -> tvm.IRModule:
    """``mod`` carrying ``value`` (JSON-serializable) as its result ``name``."""
    return mod.with_attr(RESULT_PREFIX + name, json.dumps(value))


def take_results(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict[str, Any]]:
    """``mod`` without its results, and the results by name."""
    attrs = dict(mod.attrs) if mod.attrs is not None else {}
    results = {str(key)[len(RESULT_PREFIX):]: json.loads(str(value))
               for key, value in attrs.items() if str(key).startswith(RESULT_PREFIX)}
    for name in results:
        mod = mod.without_attr(RESULT_PREFIX + name)
    return mod, results
