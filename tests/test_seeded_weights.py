"""seeded_weights: the same ConvNeXt weights from a seed on any machine, exact in float16."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.model import create_model
from pipeline.seeded_weights import seeded_array, seeded_state


def _state(variant: str, seed: int) -> dict[str, np.ndarray]:
    model = create_model(variant, num_classes=10)
    return seeded_state(((k, tuple(v.shape)) for k, v in model.state_dict().items()), seed)


def test_values_depend_on_seed_and_name_only_and_survive_float16():
    state = _state("micro", 0)
    again = _state("micro", 0)
    assert all(np.array_equal(state[k], again[k]) for k in state)
    assert not np.array_equal(state["head.weight"], _state("micro", 1)["head.weight"])
    # A value does not depend on which other parameters exist.
    np.testing.assert_array_equal(seeded_array("head.weight", (10, 128), 0), state["head.weight"])
    for value in state.values():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value.astype(np.float16).astype(np.float32), value)


def test_a_seeded_model_computes_finite_varied_logits():
    model = create_model("micro", num_classes=10).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in _state("micro", 0).items()})
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((16, 3, 32, 32), dtype=np.float32))
    with torch.no_grad():
        logits = model(x).numpy()
    assert np.isfinite(logits).all()
    assert 0.1 < logits.std() < 100
    # Blocks are not identities (layer scale 1/4, not 1e-6): outputs differ between inputs.
    assert len(set(logits.argmax(1))) > 1
