import inspect
import json
import math

import pytest
import torch

from calibration import fashion_mnist
from conftest import run_cli
from pipeline.checkpoints import load_model_from_checkpoint, save_checkpoint
from pipeline.errors import PipelineError
from pipeline.model import create_model
from pipeline.training.loop import resume_path, train
from pipeline.training.recipe import (
    TrainConfig,
    lr_factor,
    param_groups,
    random_crop,
    random_erase,
    random_hflip,
)
from pipeline.cli.train import train_command

needs_data = pytest.mark.skipif(
    not fashion_mnist.available(), reason=f"Fashion-MNIST not installed (apt-get install {fashion_mnist.APT_PACKAGE})"
)

# A tiny run on a slice of the real training set: 8 steps of 32 per epoch, on one thread (fast
# on a busy machine, and the same kernels whatever the core count).
TINY = dict(
    variant="micro", input_size=32, batch_size=32, train_limit=256, test_limit=200,
    epochs=2, warmup_epochs=0.5, threads=1,
)


def quiet(line: str) -> None:
    pass


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- pieces ------------------------------------------------------------------------------------


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    factors = [lr_factor(step, warmup_steps=10, total_steps=110, min_ratio=0.01) for step in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.01 + 0.99 * 0.5)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(110, 10, 110, 0.01) == pytest.approx(0.01)


def test_weight_decay_skips_norms_biases_and_layer_scale():
    model = create_model("micro", num_classes=10, in_chans=1)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "stages.0.0.gamma" in skipped and "norm.weight" in skipped and "head.bias" in skipped
    assert "downsample_layers.0.1.weight" in skipped  # the stem's LayerNorm
    assert {names[id(p)] for p in decay["params"]} >= {"head.weight", "stages.0.0.dwconv.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_augmentations_keep_shape_are_seeded_and_pad_with_black():
    images = torch.randn(16, 1, 32, 32)
    black = torch.full((1, 1, 1, 1), -0.5)
    crop = random_crop(images, 4, black, torch.Generator().manual_seed(1))
    assert crop.shape == images.shape
    assert torch.equal(crop, random_crop(images, 4, black, torch.Generator().manual_seed(1)))
    # Every crop is the image shifted by at most 4 pixels, with black where it moved in.
    ones = random_crop(torch.full((16, 1, 32, 32), 5.0), 4, black, torch.Generator().manual_seed(1))
    assert set(ones.unique().tolist()) <= {5.0, -0.5} and (ones == 5.0).sum(dim=(1, 2, 3)).min() >= 28 * 28
    assert torch.equal(random_crop(images, 0, black, torch.Generator()), images)

    flipped = random_hflip(images, torch.Generator().manual_seed(2))
    assert all(torch.equal(f, i) or torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images))

    erased = random_erase(images, 1.0, torch.Generator().manual_seed(3))
    changed = (erased != images).flatten(1).sum(1)
    assert (changed > 0).all() and (changed <= 32 * 32 // 3 + 64).all()
    assert torch.equal(random_erase(images, 0.0, torch.Generator().manual_seed(3)), images)


def test_config_rejects_bad_settings_in_one_line():
    with pytest.raises(PipelineError) as excinfo:
        TrainConfig(input_size=48)
    assert "multiple of 32" in one_line(excinfo)
    with pytest.raises(PipelineError, match="--init-weights"):
        TrainConfig(reset_head=True)
    with pytest.raises(PipelineError, match="--test-data"):
        TrainConfig(data="some/folder")
    with pytest.raises(PipelineError, match="--warmup-epochs"):
        TrainConfig(epochs=2, warmup_epochs=3)
    with pytest.raises(PipelineError, match="unknown variant"):
        TrainConfig(variant="huge")


def test_cli_options_mirror_the_config_defaults():
    defaults = TrainConfig()
    renamed = {"train_limit": 0, "test_limit": 0, "threads": 0}  # the CLI spells None as 0
    for name, parameter in inspect.signature(train_command).parameters.items():
        if name in ("output", "resume"):
            continue
        expected = renamed.get(name, getattr(defaults, name))
        assert parameter.default == expected, name


# --- training on the real data ----------------------------------------------------------------


@needs_data
def test_loss_falls_on_real_fashion_mnist(tmp_path):
    lines = []
    record = train(TrainConfig(**{**TINY, "train_limit": 512, "epochs": 3}), tmp_path / "m.pth", progress=lines.append)
    losses = [epoch["train_loss"] for epoch in record["history"]]
    assert losses[-1] < losses[0] - 0.2, losses
    assert losses[0] < math.log(10) + 0.1
    assert any(line.startswith("epoch 3/3 loss") and "test top-1" in line for line in lines)
    assert record["test_top1"] > 30  # chance is 10%

    # The checkpoint loads like any other, and the record beside it describes it.
    model = load_model_from_checkpoint(tmp_path / "m.pth")
    assert model.head.out_features == 10 and model.downsample_layers[0][0].in_channels == 1
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["sha256"] == record["sha256"] and saved["config"]["train_limit"] == 512
    assert saved["test_data"]["source"] == "fashion-mnist:test"
    assert not resume_path(tmp_path / "m.pth").exists()  # removed once the checkpoint is written
    training = torch.load(tmp_path / "m.pth", weights_only=True)["training"]
    assert training["history"] == record["history"]


@needs_data
def test_same_seed_gives_same_weights(tmp_path):
    config = TrainConfig(**{**TINY, "epochs": 1, "test_limit": 50})
    train(config, tmp_path / "a.pth", progress=quiet)
    train(config, tmp_path / "b.pth", progress=quiet)
    train(TrainConfig(**{**TINY, "epochs": 1, "test_limit": 50, "seed": 1}), tmp_path / "c.pth", progress=quiet)
    a, b, c = (torch.load(tmp_path / f"{n}.pth", weights_only=True)["model"] for n in "abc")
    assert same_weights(a, b)
    assert not same_weights(a, c)


class Stop(Exception):
    pass


@needs_data
def test_resume_continues_exactly(tmp_path):
    config = TrainConfig(**TINY, drop_path_rate=0.1)  # stochastic depth: the global RNG must resume too
    straight = train(config, tmp_path / "straight.pth", progress=quiet)

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/2 loss"):
            raise Stop

    with pytest.raises(Stop):
        train(config, tmp_path / "resumed.pth", progress=stop_after_first_epoch)
    state = resume_path(tmp_path / "resumed.pth")
    assert state.exists() and not (tmp_path / "resumed.pth").exists()

    with pytest.raises(PipelineError, match="other settings"):
        train(TrainConfig(**{**TINY, "lr": 1e-3}, drop_path_rate=0.1), tmp_path / "resumed.pth", resume=state)
    resumed = train(config, tmp_path / "resumed.pth", resume=state, progress=quiet)

    a, b = (torch.load(tmp_path / f"{n}.pth", weights_only=True)["model"] for n in ("straight", "resumed"))
    assert same_weights(a, b)
    strip = lambda history: [{k: v for k, v in e.items() if k != "seconds"} for e in history]  # noqa: E731
    assert strip(resumed["history"]) == strip(straight["history"])


@needs_data
def test_fine_tuning_to_other_classes_needs_reset_head(tmp_path):
    source = create_model("micro", num_classes=5, in_chans=1, seed=7)
    save_checkpoint(source, tmp_path / "five.pth", "micro", num_classes=5, in_chans=1)
    base = {**TINY, "epochs": 1, "train_limit": 32, "test_limit": 32, "init_weights": tmp_path / "five.pth"}

    with pytest.raises(PipelineError) as excinfo:
        train(TrainConfig(**base), tmp_path / "ft.pth", progress=quiet)
    assert "--reset-head" in one_line(excinfo)

    # A vanishing learning rate: what comes out is the checkpoint's backbone with a new 10-class head.
    record = train(TrainConfig(**base, reset_head=True, lr=1e-12, min_lr=0.0), tmp_path / "ft.pth", progress=quiet)
    assert record["init_weights"]["head_reset"] is True
    tuned = torch.load(tmp_path / "ft.pth", weights_only=True)["model"]
    assert tuned["head.weight"].shape == (10, 128)
    original = source.state_dict()
    assert all(torch.allclose(tuned[k], original[k], atol=1e-6) for k in original if not k.startswith("head."))


@needs_data
def test_command_line_trains_and_reports_user_errors(tmp_path):
    output = ["--output", str(tmp_path / "cli.pth")]
    tiny = ["--epochs", "1", "--warmup-epochs", "0.5", "--train-limit", "64", "--test-limit", "64",
            "--batch-size", "32", "--threads", "1"]
    ok = run_cli("train", *output, *tiny, cwd=tmp_path, check=True)
    assert "epoch 1/1 loss" in ok.stdout
    record = json.loads((tmp_path / "cli.json").read_text())
    assert record["command"].startswith("pipeline train --output") and record["epochs"] == 1

    bad = run_cli("train", *output, "--input-size", "40", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "multiple of 32" in bad.stderr
