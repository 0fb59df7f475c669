import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.model import (
    VARIANTS,
    Block,
    DropPath,
    LayerNorm2d,
    count_parameters,
    create_model,
    get_variant,
)

# Published parameter counts at 1000 classes, in millions (paper table; timm for atto..nano).
PAPER_PARAMS_M = {
    "atto": 3.7,
    "femto": 5.2,
    # 9,045,672 = 9.05M; timm's card for convnext_pico.d1_in1k says 9.0. The 9.1 in
    # shared/reference/convnext-facts.md is convnext_pico_ols (overlapping stem) or ConvNeXt-V2 pico.
    "pico": 9.0,
    "nano": 15.6,
    "tiny": 28.6,
    "small": 50.2,
    "base": 88.6,
    "large": 197.8,
    "xlarge": 350.2,
}
PAPER_VARIANTS = [name for name, spec in VARIANTS.items() if spec.paper]


def _meta_model(variant: str, **kwargs) -> nn.Module:
    # Meta tensors have shapes but no storage: xlarge costs nothing to build.
    with torch.device("meta"):
        return create_model(variant, **kwargs)


def test_every_paper_variant_has_a_published_count():
    assert sorted(PAPER_VARIANTS) == sorted(PAPER_PARAMS_M)
    assert [n for n, s in VARIANTS.items() if not s.paper] == ["micro", "mini"]


@pytest.mark.parametrize("variant", PAPER_VARIANTS)
def test_parameter_count_matches_paper(variant):
    model = _meta_model(variant)
    assert round(count_parameters(model) / 1e6, 1) == PAPER_PARAMS_M[variant]


@pytest.mark.parametrize("variant, exact", [("tiny", 28_589_128), ("pico", 9_045_672)])
def test_exact_parameter_counts(variant, exact):
    assert count_parameters(_meta_model(variant)) == exact


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_structure(variant):
    spec = VARIANTS[variant]
    model = _meta_model(variant)
    assert [len(stage) for stage in model.stages] == list(spec.depths)

    stem_conv, stem_norm = model.downsample_layers[0]
    assert (stem_conv.kernel_size, stem_conv.stride) == ((4, 4), (4, 4))
    assert isinstance(stem_norm, LayerNorm2d)
    for i in range(1, 4):
        norm, conv = model.downsample_layers[i]
        assert isinstance(norm, LayerNorm2d)
        assert (conv.kernel_size, conv.stride) == ((2, 2), (2, 2))
        assert (conv.in_channels, conv.out_channels) == (spec.dims[i - 1], spec.dims[i])

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert len(blocks) == sum(spec.depths)
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert len(gelus) == len(blocks)  # exactly one activation per block
    assert all(g.approximate == "none" for g in gelus)
    for block in blocks:
        c = block.dwconv.in_channels
        assert block.dwconv.kernel_size == (7, 7) and block.dwconv.padding == (3, 3)
        assert block.dwconv.groups == c == block.dwconv.out_channels
        assert (block.pwconv1.in_features, block.pwconv1.out_features) == (c, 4 * c)
        assert (block.pwconv2.in_features, block.pwconv2.out_features) == (4 * c, c)
        assert block.norm.eps == 1e-6 and block.gamma.shape == (c,)
    assert model.norm.eps == 1e-6
    assert model.head.in_features == spec.dims[-1]


def test_official_state_dict_names():
    keys = list(create_model("micro").state_dict())
    assert keys[:4] == [
        "downsample_layers.0.0.weight",
        "downsample_layers.0.0.bias",
        "downsample_layers.0.1.weight",
        "downsample_layers.0.1.bias",
    ]
    for part in ("dwconv.weight", "norm.weight", "pwconv1.weight", "pwconv2.bias", "gamma"):
        assert f"stages.0.0.{part}" in keys
    assert keys[-4:] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]


def test_initialisation_like_official():
    model = create_model("mini", num_classes=1000)
    assert torch.all(model.stages[0][0].gamma == 1e-6)
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_layer_scale_off_removes_gamma():
    model = create_model("micro", layer_scale_init_value=0.0)
    assert not any(k.endswith("gamma") for k in model.state_dict())
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


@pytest.mark.parametrize(
    "variant, num_classes, in_chans, size",
    [
        ("micro", 1000, 3, (64, 64)),
        ("micro", 10, 1, (32, 32)),
        ("micro", 7, 4, (96, 128)),
        ("micro", 2, 3, (50, 70)),  # not a multiple of 32: convs floor, pooling absorbs the rest
        ("mini", 100, 3, (64, 64)),
    ],
)
def test_forward_shapes(variant, num_classes, in_chans, size):
    model = create_model(variant, num_classes=num_classes, in_chans=in_chans).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, *size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    assert model.forward_features(torch.randn(2, in_chans, *size)).shape == (2, VARIANTS[variant].dims[-1])


def test_eval_is_deterministic_even_with_drop_path():
    x = torch.randn(2, 3, 64, 64)
    plain = create_model("micro", seed=3).eval()
    dropping = create_model("micro", seed=3, drop_path_rate=0.3).eval()
    with torch.no_grad():
        a, b, c = plain(x), plain(x), dropping(x)
    assert torch.equal(a, b)
    # Drop path has no parameters and is the identity in eval mode.
    assert torch.equal(a, c)


def test_seed_determinism_and_global_rng_untouched():
    a = create_model("micro", seed=5).state_dict()
    b = create_model("micro", seed=5).state_dict()
    c = create_model("micro", seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])

    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    create_model("micro", seed=0)
    assert torch.equal(torch.rand(4), expected)


def test_drop_path_rates_rise_linearly():
    model = create_model("micro", drop_path_rate=0.4)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert isinstance(blocks[0].drop_path, nn.Identity)  # rate 0 at the first block
    assert blocks[-1].drop_path.drop_prob == pytest.approx(0.4)


def test_drop_path_drops_whole_samples_in_training():
    drop = DropPath(0.5).train()
    torch.manual_seed(0)
    x = torch.ones(256, 4, 2, 2)
    y = drop(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert 0 < (per_sample[:, 0] == 0).sum() < 256
    assert torch.equal(drop.eval()(x), x)


def test_layernorm2d_matches_functional():
    norm = LayerNorm2d(8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, 5, 5)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (8,), norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), ref)


def test_unknown_variant_lists_known_ones():
    with pytest.raises(PipelineError) as err:
        create_model("huge")
    message = str(err.value)
    assert "'huge'" in message and "atto" in message and "xlarge" in message and "micro" in message
    assert "\n" not in message
    with pytest.raises(PipelineError):
        get_variant("Tiny")


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"in_chans": 0}, {"drop_path_rate": 1.0}])
def test_bad_arguments(kwargs):
    with pytest.raises(PipelineError):
        create_model("micro", **kwargs)
