"""ConvNeXt as "A ConvNet for the 2020s" (Liu et al., CVPR 2022) defines it.

Module names match the official release (facebookresearch/ConvNeXt, models/convnext.py),
so its state_dicts load with no renaming: `downsample_layers`, `stages`, `norm`, `head`,
and per block `dwconv`, `norm`, `pwconv1`, `act`, `pwconv2`, `gamma`.
Variants are rows of one table (`VARIANTS`), not one factory per variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class VariantSpec:
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    # True for variants with published weights/figures; False for our own tiny test/demo models.
    paper: bool = True


VARIANTS: dict[str, VariantSpec] = {
    # atto..nano: the small isotropic-ratio variants released with timm (and in the official repo's
    # later ConvNeXt-V2 table); tiny..xlarge: the paper's Table.
    "atto": VariantSpec((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": VariantSpec((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": VariantSpec((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": VariantSpec((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": VariantSpec((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": VariantSpec((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": VariantSpec((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": VariantSpec((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": VariantSpec((3, 3, 27, 3), (256, 512, 1024, 2048)),
    # Not from the paper: small enough to train and test on a CPU in seconds.
    "micro": VariantSpec((1, 1, 2, 1), (16, 32, 64, 128), paper=False),
    "mini": VariantSpec((2, 2, 4, 2), (24, 48, 96, 192), paper=False),
}


def get_variant(name: str) -> VariantSpec:
    """Look a variant up by name; unknown names get an error listing the known ones."""
    spec = VARIANTS.get(name)
    if spec is None:
        raise PipelineError(f"unknown variant '{name}'; known variants: {', '.join(VARIANTS)}")
    return spec


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of (N, C, H, W) tensors (official `data_format="channels_first"`).

    Written out rather than permuting around nn.LayerNorm, as the official release does; the
    parameter names (`weight`, `bias`) match it.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)  # biased variance, as F.layer_norm uses
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class DropPath(nn.Module):
    """Stochastic depth per sample (drops the whole residual branch); identity in eval mode."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        # One Bernoulli draw per sample, broadcast over the remaining dims.
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear C->4C -> GELU -> Linear 4C->C -> gamma -> drop path -> + x.

    The pointwise convs are Linear layers on channels-last tensors, as in the official release
    (it measured them slightly faster in PyTorch than 1x1 convs).
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()  # exact (erf) GELU, approximate="none", as the official release
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # No `gamma` key at all when layer scale is off, so such checkpoints load strictly.
        self.gamma = (
            nn.Parameter(layer_scale_init_value * torch.ones(dim))
            if layer_scale_init_value > 0
            else None
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        return shortcut + self.drop_path(x)


class ConvNeXt(nn.Module):
    """Stem (4x4/4) and three 2x2/2 downsamplings around four stages of Blocks, then pool -> norm -> head.

    Total stride is 32; the input size is not fixed (global average pooling).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            nn.Sequential(
                nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
                LayerNorm2d(dims[0], eps=1e-6),
            )
        )
        for i in range(1, len(dims)):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm2d(dims[i - 1], eps=1e-6),
                    nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2),
                )
            )

        # Stochastic depth rises linearly from 0 at the first block to drop_path_rate at the last.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        cur = 0
        for depth, dim in zip(depths, dims):
            self.stages.append(
                nn.Sequential(
                    *[Block(dim, rates[cur + j], layer_scale_init_value) for j in range(depth)]
                )
            )
            cur += depth

        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

        self.apply(self._init_weights)
        # head_init_scale < 1 shrinks the fresh head, which the official recipe uses when fine-tuning.
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            # Absolute bounds [-2, 2] as timm's trunc_normal_ (i.e. +-100 std: effectively untruncated).
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> pooled, normalised features (N, dims[-1])."""
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = downsample(x)
            x = stage(x)
        # Global average pool: (N, C, H/32, W/32) -> (N, C).
        return self.norm(x.mean(dim=(-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> logits (N, num_classes)."""
        return self.head(self.forward_features(x))


def create_model(
    variant: str,
    num_classes: int = 1000,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    layer_scale_init_value: float = 1e-6,
    seed: int | None = 0,
) -> ConvNeXt:
    """Build a ConvNeXt variant from `VARIANTS`.

    With `seed` set, the initial weights depend only on the seed (the global RNG is left as it was);
    `seed=None` draws from the global RNG.
    """
    spec = get_variant(variant)
    if num_classes < 1:
        raise PipelineError(f"num_classes must be at least 1, got {num_classes}; pass --num-classes N")
    if in_chans < 1:
        raise PipelineError(f"in_chans must be at least 1, got {in_chans}; pass --in-chans N")
    if not 0.0 <= drop_path_rate < 1.0:
        raise PipelineError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}; pass e.g. 0.1")

    def build() -> ConvNeXt:
        return ConvNeXt(
            in_chans=in_chans,
            num_classes=num_classes,
            depths=spec.depths,
            dims=spec.dims,
            drop_path_rate=drop_path_rate,
            layer_scale_init_value=layer_scale_init_value,
        )

    if seed is None:
        return build()
    # fork_rng restores the global CPU RNG afterwards, so seeding here does not change what the
    # caller's later random draws are. devices=[]: weights are initialised on the CPU generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not); works on meta-device models."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "VARIANTS",
    "VariantSpec",
    "ConvNeXt",
    "Block",
    "LayerNorm2d",
    "DropPath",
    "create_model",
    "count_parameters",
    "get_variant",
]
