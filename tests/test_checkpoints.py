import argparse
import hashlib
import os
import re

import pytest
import torch

from pipeline.checkpoints import (
    detect_layout,
    guess_variant,
    load_weights,
    save_checkpoint,
    timm_key_to_official,
    to_official,
    torchvision_key_to_official,
)
from pipeline.errors import PipelineError
from pipeline.model import VARIANTS, ConvNeXt, create_model


class _Opaque:
    """A class weights-only loading refuses (stands in for a pickled model object)."""


# ----- inverse mappings (official -> other layouts), written independently of the module ------

_OFFICIAL_TO_TIMM_PART = {"dwconv": "conv_dw", "norm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}
_OFFICIAL_TO_TV_PART = {"dwconv": "block.0", "norm": "block.2", "pwconv1": "block.3", "pwconv2": "block.5"}


def official_to_timm(key: str) -> str:
    if m := re.fullmatch(r"downsample_layers\.0\.(\d)\.(\w+)", key):
        return f"stem.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"downsample_layers\.(\d)\.(\d)\.(\w+)", key):
        return f"stages.{m[1]}.downsample.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"stages\.(\d)\.(\d+)\.gamma", key):
        return f"stages.{m[1]}.blocks.{m[2]}.gamma"
    if m := re.fullmatch(r"stages\.(\d)\.(\d+)\.(\w+)\.(\w+)", key):
        return f"stages.{m[1]}.blocks.{m[2]}.{_OFFICIAL_TO_TIMM_PART[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"norm\.(\w+)", key):
        return f"head.norm.{m[1]}"
    if m := re.fullmatch(r"head\.(\w+)", key):
        return f"head.fc.{m[1]}"
    raise AssertionError(key)


def official_to_torchvision(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    if m := re.fullmatch(r"downsample_layers\.(\d)\.(\d)\.(\w+)", key):
        return f"features.{2 * int(m[1])}.{m[2]}.{m[3]}", value
    if m := re.fullmatch(r"stages\.(\d)\.(\d+)\.gamma", key):
        return f"features.{2 * int(m[1]) + 1}.{m[2]}.layer_scale", value.reshape(-1, 1, 1)
    if m := re.fullmatch(r"stages\.(\d)\.(\d+)\.(\w+)\.(\w+)", key):
        return f"features.{2 * int(m[1]) + 1}.{m[2]}.{_OFFICIAL_TO_TV_PART[m[3]]}.{m[4]}", value
    if m := re.fullmatch(r"norm\.(\w+)", key):
        return f"classifier.0.{m[1]}", value
    if m := re.fullmatch(r"head\.(\w+)", key):
        return f"classifier.2.{m[1]}", value
    raise AssertionError(key)


def as_timm(sd):
    return {official_to_timm(k): v.clone() for k, v in sd.items()}


def as_torchvision(sd):
    return dict(official_to_torchvision(k, v.clone()) for k, v in sd.items())


def _meta_state_dict(variant):
    with torch.device("meta"):
        return create_model(variant).state_dict()


def _outputs_equal(a, b, in_chans=3):
    x = torch.randn(2, in_chans, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


# ----- key conversion ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "timm_key, official",
    [
        ("stem.0.weight", "downsample_layers.0.0.weight"),
        ("stem.1.bias", "downsample_layers.0.1.bias"),
        ("stages.2.downsample.0.weight", "downsample_layers.2.0.weight"),
        ("stages.3.downsample.1.bias", "downsample_layers.3.1.bias"),
        ("stages.2.blocks.26.conv_dw.weight", "stages.2.26.dwconv.weight"),
        ("stages.0.blocks.1.norm.weight", "stages.0.1.norm.weight"),
        ("stages.1.blocks.0.mlp.fc1.weight", "stages.1.0.pwconv1.weight"),
        ("stages.1.blocks.0.mlp.fc2.bias", "stages.1.0.pwconv2.bias"),
        ("stages.3.blocks.2.gamma", "stages.3.2.gamma"),
        ("head.norm.weight", "norm.weight"),
        ("head.fc.bias", "head.bias"),
        ("something.else", "something.else"),
    ],
)
def test_timm_key_to_official(timm_key, official):
    assert timm_key_to_official(timm_key) == official


@pytest.mark.parametrize(
    "tv_key, official",
    [
        ("features.0.0.weight", "downsample_layers.0.0.weight"),
        ("features.0.1.bias", "downsample_layers.0.1.bias"),
        ("features.2.0.weight", "downsample_layers.1.0.weight"),
        ("features.6.1.weight", "downsample_layers.3.1.weight"),
        ("features.1.0.block.0.weight", "stages.0.0.dwconv.weight"),
        ("features.3.2.block.2.bias", "stages.1.2.norm.bias"),
        ("features.5.26.block.3.weight", "stages.2.26.pwconv1.weight"),
        ("features.7.2.block.5.bias", "stages.3.2.pwconv2.bias"),
        ("features.7.0.layer_scale", "stages.3.0.gamma"),
        ("classifier.0.weight", "norm.weight"),
        ("classifier.2.bias", "head.bias"),
    ],
)
def test_torchvision_key_to_official(tv_key, official):
    assert torchvision_key_to_official(tv_key) == official


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conversions_invert_and_guess_variant(variant):
    sd = _meta_state_dict(variant)
    for layout, converted in [("official", sd), ("timm", as_timm(sd)), ("torchvision", as_torchvision(sd))]:
        assert detect_layout(converted) == layout
        back = to_official(converted)
        assert list(back) == list(sd)
        assert all(back[k].shape == sd[k].shape for k in sd)
        assert guess_variant(converted) == variant


def test_guess_variant_unknown_architecture():
    sd = ConvNeXt(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64)).state_dict()
    assert guess_variant(sd) is None
    assert guess_variant({"foo.weight": torch.zeros(1)}) is None


# ----- loading -------------------------------------------------------------------------------

def test_official_round_trip(tmp_path):
    source = create_model("micro", num_classes=10, seed=1)
    path = save_checkpoint(source, tmp_path / "micro.pth", "micro", 10, 3, extra={"epoch": 4})
    assert [p.name for p in tmp_path.iterdir()] == ["micro.pth"]  # no temp file left behind

    raw = torch.load(path, weights_only=True)
    assert (raw["variant"], raw["num_classes"], raw["in_chans"], raw["epoch"]) == ("micro", 10, 3, 4)

    target = create_model("micro", num_classes=10, seed=2)
    info = load_weights(target, path, "micro")
    assert _outputs_equal(source, target)
    assert info["layout"] == "official" and info["guessed_variant"] == "micro"
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_save_overwrites_atomically_and_refuses_reserved_extra(tmp_path):
    path = tmp_path / "sub" / "ckpt.pth"
    save_checkpoint(create_model("micro", seed=1), path, "micro", 1000, 3)
    save_checkpoint(create_model("micro", seed=2), path, "micro", 1000, 3)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pth"]
    with pytest.raises(PipelineError, match="reserved"):
        save_checkpoint(create_model("micro"), path, "micro", 1000, 3, extra={"model": 1})
    with pytest.raises(PipelineError, match="--num-classes 1000"):
        save_checkpoint(create_model("micro"), path, "micro", 10, 3)


@pytest.mark.parametrize(
    "layout, wrap",
    [
        ("timm", lambda sd: {"state_dict": sd}),
        ("timm", lambda sd: {f"module.{k}": v for k, v in sd.items()}),
        ("torchvision", lambda sd: sd),
        ("torchvision", lambda sd: {"model_ema": sd, "epoch": 3}),
        ("official", lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}),
    ],
)
def test_foreign_layouts_load_exactly(tmp_path, layout, wrap):
    source = create_model("micro", num_classes=10, in_chans=1, seed=1)
    sd = source.state_dict()
    converted = {"timm": as_timm, "torchvision": as_torchvision, "official": dict}[layout](sd)
    path = tmp_path / "foreign.pt"
    torch.save(wrap(converted), path)

    target = create_model("micro", num_classes=10, in_chans=1, seed=2)
    assert not _outputs_equal(source, target, in_chans=1)
    info = load_weights(target, path, "micro")
    assert info["layout"] == layout
    assert _outputs_equal(source, target, in_chans=1)


def test_official_training_checkpoint_with_args_namespace_loads(tmp_path):
    source = create_model("micro", seed=1)
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": source.state_dict(), "epoch": 3, "args": argparse.Namespace(lr=4e-3)}, path)
    target = create_model("micro", seed=2)
    load_weights(target, path, "micro")
    assert _outputs_equal(source, target)


def _error(model, path, variant, **kwargs) -> str:
    with pytest.raises(PipelineError) as err:
        load_weights(model, path, variant, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    assert "not found" in _error(create_model("micro"), tmp_path / "nope.pth", "micro")


@pytest.mark.parametrize(
    "content",
    [os.urandom(4096), b"hello, not a checkpoint", b""],
    ids=["random-bytes", "text", "empty"],
)
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    assert "not a PyTorch checkpoint" in _error(create_model("micro"), path, "micro")


@pytest.mark.parametrize(
    "payload, expected",
    [
        ([1, 2, 3], "not a dict of tensors"),
        ({"model": {"a": 1}}, "not a dict of tensors"),
        ({"encoder.weight": torch.zeros(2)}, "not a ConvNeXt layout"),
    ],
)
def test_not_a_convnext_state_dict(tmp_path, payload, expected):
    path = tmp_path / "x.pth"
    torch.save(payload, path)
    assert expected in _error(create_model("micro"), path, "micro")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save({"model": create_model("micro").state_dict(), "thing": _Opaque()}, path)
    message = _error(create_model("micro"), path, "micro")
    assert message.startswith(f"checkpoint {path} holds Python objects outside weights-only loading's allowed list "
                              f"({_Opaque.__module__}._Opaque), whose code would run when it is loaded; if you trust "
                              "the file, re-save its weights with: ")
    assert "weights_only=False" in message


class _RunsCommand:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Evaluates:
    def __reduce__(self):
        return eval, ("1 + 1",)


@pytest.mark.parametrize("writer", ["torch.save", "legacy torch.save", "pickle.dump"])
def test_a_checkpoint_that_holds_code_says_so_and_runs_nothing(tmp_path, writer):
    import pickle

    path, marker = tmp_path / "payload.pth", tmp_path / "ran"
    payload = {"model": create_model("micro").state_dict(), "x": _RunsCommand(marker)}
    if writer == "pickle.dump":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch.save")
    message = _error(create_model("micro"), path, "micro")
    assert message == (
        f"checkpoint {path} holds code that would run when it is loaded ({os.system.__module__}.system); it was not "
        "loaded and should not be: take the weights from the model's publisher, or re-save them where the model "
        "was trained with torch.save(model.state_dict(), path)"
    )
    assert not marker.exists()
    torch.save({"model": {}, "x": _Evaluates()}, path)
    assert "holds code that would run when it is loaded (builtins.eval)" in _error(create_model("micro"), path, "micro")


def test_a_plain_pickle_without_code_is_named_as_a_pickle(tmp_path):
    import pickle

    path = tmp_path / "plain.pth"
    path.write_bytes(pickle.dumps({"model": {"a": [1, 2]}}, protocol=4))
    message = _error(create_model("micro"), path, "micro")
    # (torch's reason, e.g. "Unsupported operand 149", in the brackets)
    assert message.startswith(f"checkpoint {path} is a pickle that weights-only loading cannot read (")
    assert "); if you trust the file, re-save its weights with: " in message


def _as_module(state_dict) -> torch.nn.Module:
    """A whole model object (what torch.save(model) pickles) with these keys, built of plain nn.Modules."""
    root = torch.nn.Module()
    for key, value in state_dict.items():
        *parents, name = key.split(".")
        module = root
        for part in parents:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        module.register_parameter(name, torch.nn.Parameter(value))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["official", "timm", "torchvision"])
@pytest.mark.parametrize("form", ["training checkpoint", "whole model"])
def test_the_resave_recipe_works_for_every_layout(tmp_path, layout, form):
    """Run the recipe the message prints, as printed: it must give a file that loads, whatever the layout."""
    import shlex
    import subprocess

    import numpy as np

    from conftest import REPO

    source = create_model("micro", num_classes=10, seed=2)
    weights = {"official": dict, "timm": as_timm, "torchvision": as_torchvision}[layout](source.state_dict())
    if form == "whole model":
        payload = _as_module(weights)
    else:
        # timm's training script saves its metric as a numpy scalar, which weights-only loading refuses.
        wrapper = "model" if layout == "official" else "state_dict"
        payload = {wrapper: weights, "epoch": 3, "metric": np.float64(81.5)}
    torch.save(payload, tmp_path / "trained.pth")
    message = _error(create_model("micro", num_classes=10), tmp_path / "trained.pth", "micro")
    recipe = message.split("re-save its weights with: ")[1]
    command, _, out = recipe.partition(" -- then use ")
    result = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    loaded = create_model("micro", num_classes=10)
    info = load_weights(loaded, tmp_path / out, "micro")
    assert info["layout"] == layout and _outputs_equal(source, loaded)


def test_wrong_variant_by_keys(tmp_path):
    path = save_checkpoint(create_model("micro"), tmp_path / "micro.pth", "micro", 1000, 3)
    message = _error(create_model("mini"), path, "mini")
    assert re.match(r"checkpoint has \d+ missing and \d+ unexpected keys \(first missing: stages\.", message)
    assert "it looks like variant 'micro', not 'mini'" in message and "--variant micro" in message


def test_wrong_variant_by_shapes(tmp_path):
    # atto and femto share depths, so only the shapes tell them apart.
    path = tmp_path / "atto.pth"
    torch.save({"model": create_model("atto").state_dict()}, path)
    message = _error(create_model("femto"), path, "femto")
    assert "has shape" in message and "--variant atto" in message


def test_unknown_architecture(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save(ConvNeXt(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64)).state_dict(), path)
    message = _error(create_model("micro"), path, "micro")
    assert "matches no known variant" in message and "(1, 1, 2, 1)" in message


def test_layer_scale_mismatch(tmp_path):
    path = save_checkpoint(create_model("micro"), tmp_path / "m.pth", "micro", 1000, 3)
    message = _error(create_model("micro", layer_scale_init_value=0), path, "micro")
    assert "0 missing and 5 unexpected" in message and "layer_scale_init_value=1e-6" in message

    path = save_checkpoint(create_model("micro", layer_scale_init_value=0), tmp_path / "n.pth", "micro", 1000, 3)
    message = _error(create_model("micro"), path, "micro")
    assert "5 missing and 0 unexpected" in message and "layer_scale_init_value=0" in message


def test_in_chans_mismatch(tmp_path):
    path = save_checkpoint(create_model("micro"), tmp_path / "m.pth", "micro", 1000, 3)
    message = _error(create_model("micro", in_chans=1), path, "micro")
    assert message == "checkpoint stem takes 3 input channels, model expects 1; pass --in-chans 3"


def test_head_mismatch_and_reset_head(tmp_path):
    source = create_model("micro", num_classes=1000, seed=1)
    path = save_checkpoint(source, tmp_path / "m.pth", "micro", 1000, 3)
    target = create_model("micro", num_classes=10, seed=2)
    message = _error(target, path, "micro")
    assert message == (
        "checkpoint head has 1000 classes, model expects 10; pass --num-classes 1000, or fine-tune it on "
        f"your classes with `pipeline train --init-weights {path} --reset-head`"
    )

    fresh_head = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("head.")}
    info = load_weights(target, path, "micro", reset_head=True)
    assert info["head_reset"] and info["checkpoint_num_classes"] == 1000
    loaded = target.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in fresh_head.items())
    source_sd = source.state_dict()
    assert all(torch.equal(loaded[k], source_sd[k]) for k in loaded if not k.startswith("head."))

    # reset_head also works when the sizes already agree (fine-tuning on a new 1000-class task).
    same = create_model("micro", num_classes=1000, seed=3)
    head_before = same.head.weight.clone()
    load_weights(same, path, "micro", reset_head=True)
    assert torch.equal(same.head.weight, head_before)
