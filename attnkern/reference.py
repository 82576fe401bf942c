"""Reference CBAM, SE and BAM in plain PyTorch: the definition every fused kernel is tested against.

Conventions (shared by the fused modules in attnkern.modules, which subclass these):
- x is (N, C, H, W); the MLP hidden width is channels // reduction.
- CBAM's spatial gate pools channels in the order [mean; max] (paper, timm); the authors' code
  uses [max; mean], and loading its weights swaps the conv's two input channels.
- Max pooling follows torch.max(dim): the gradient goes to the first maximal element, and NaN
  propagates (counts as maximal).
- State dicts load in three layouts, detected from the keys: this module's own, the authors' code
  (Jongchan/attention-module) and timm's CbamModule. See attnkern/state_dict.py.
"""
import torch
import torch.nn.functional as F
from torch import nn

from attnkern import state_dict as layouts

__all__ = ["ChannelGate", "SpatialGate", "CBAM", "SE", "BAMChannelGate", "BAMSpatialGate", "BAM", "hidden_width"]

POOL_TYPES = ("avg", "max")
BAM_COMBINES = ("product", "sum")


def hidden_width(channels, reduction):
    """channels // reduction, validated: a width of 0 is an error (timm would round it up instead)."""
    _check_positive_int("channels", channels)
    _check_positive_int("reduction", reduction)
    hidden = channels // reduction
    if hidden == 0:
        raise ValueError(
            f"channels={channels} with reduction={reduction} leaves no hidden unit "
            f"(channels // reduction == 0); use reduction <= {channels}"
        )
    return hidden


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_input(x, channels, module):
    """The checks every module applies to its input, with messages that name the problem.
    channels=None accepts any channel count."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{module}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{module}: expected a 4-D input (N, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{module}: expected a floating-point input, got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{module}: expected {channels} channels, got input with shape {tuple(x.shape)}")


class ChannelGate(nn.Module):
    """Mc = sigmoid(sum over pool types of MLP(pool_hw(x))); returns x * Mc."""

    def __init__(self, channels, reduction=16, *, pool_types=POOL_TYPES, bias=True):
        super().__init__()
        pool_types = tuple(pool_types)
        unknown = [p for p in pool_types if p not in POOL_TYPES]
        if unknown or not pool_types or len(set(pool_types)) != len(pool_types):
            raise ValueError(f"pool_types must be a non-empty subset of {POOL_TYPES} without repeats, got {pool_types}")
        self.channels = channels
        self.pool_types = pool_types
        hidden = hidden_width(channels, reduction)
        self.fc1 = nn.Linear(channels, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, channels, bias=bias)
        self.register_load_state_dict_pre_hook(layouts.channel_gate_hook)

    def gate(self, x):
        flat = x.flatten(2)
        pools = {"avg": lambda: flat.mean(dim=2), "max": lambda: flat.max(dim=2).values}
        logits = sum(self.fc2(F.relu(self.fc1(pools[p]()))) for p in self.pool_types)
        return torch.sigmoid(logits)

    def forward(self, x):
        check_input(x, self.channels, type(self).__name__)
        return x * self.gate(x)[:, :, None, None]

    def extra_repr(self):
        return f"pool_types={self.pool_types}"


class SpatialGate(nn.Module):
    """Ms = sigmoid(BN(conv_kxk([mean_c(x); max_c(x)]))); returns x * Ms.

    With norm=False the conv has a bias and no BN follows (the paper's form)."""

    def __init__(self, kernel_size=7, *, norm=True):
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=not norm)
        # The authors' BatchNorm settings (momentum 0.01), whose trained weights people have.
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01) if norm else None
        self.register_load_state_dict_pre_hook(layouts.spatial_gate_hook)

    def gate(self, x):
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.max(dim=1, keepdim=True).values], dim=1)
        logits = self.conv(pooled)
        if self.bn is not None:
            logits = self.bn(logits)
        return torch.sigmoid(logits)

    def forward(self, x):
        check_input(x, None, type(self).__name__)
        return x * self.gate(x)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., 2018): y = SpatialGate(ChannelGate(x))."""

    def __init__(
        self,
        channels,
        reduction=16,
        kernel_size=7,
        *,
        pool_types=POOL_TYPES,
        spatial=True,
        mlp_bias=True,
        spatial_norm=True,
    ):
        super().__init__()
        self.channels = channels
        self.channel = ChannelGate(channels, reduction, pool_types=pool_types, bias=mlp_bias)
        self.spatial = SpatialGate(kernel_size, norm=spatial_norm) if spatial else None
        self.register_load_state_dict_pre_hook(layouts.cbam_hook)

    def forward(self, x):
        check_input(x, self.channels, type(self).__name__)
        x = self.channel(x)
        if self.spatial is not None:
            x = self.spatial(x)
        return x


class SE(ChannelGate):
    """Squeeze-and-Excitation (Hu et al., 2018): CBAM's channel gate with average pooling only."""

    def __init__(self, channels, reduction=16, *, bias=False):
        super().__init__(channels, reduction, pool_types=("avg",), bias=bias)


class BAMChannelGate(nn.Module):
    """BAM's channel branch: fc2(ReLU(BN1d(fc1(avgpool_hw(x))))) -> (N, C) logits."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = hidden_width(channels, reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x.mean(dim=(2, 3))))))


class BAMSpatialGate(nn.Module):
    """BAM's spatial branch: 1x1 reduce -> dilated 3x3 convs -> 1x1 to one map, BN + ReLU after
    each hidden conv (the authors' code) -> (N, 1, H, W) logits."""

    def __init__(self, channels, reduction=16, *, dilation=4, num_dilated=2):
        super().__init__()
        _check_positive_int("dilation", dilation)
        if isinstance(num_dilated, bool) or not isinstance(num_dilated, int) or num_dilated < 0:
            raise ValueError(f"num_dilated must be a non-negative int, got {num_dilated!r}")
        hidden = hidden_width(channels, reduction)
        self.dilation = dilation
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.reduce_bn = nn.BatchNorm2d(hidden)
        self.dilated = nn.ModuleList(
            nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation) for _ in range(num_dilated)
        )
        self.dilated_bn = nn.ModuleList(nn.BatchNorm2d(hidden) for _ in range(num_dilated))
        self.final = nn.Conv2d(hidden, 1, 1)

    def forward(self, x):
        h = F.relu(self.reduce_bn(self.reduce(x)))
        for conv, bn in zip(self.dilated, self.dilated_bn):
            h = F.relu(bn(conv(h)))
        return self.final(h)


class BAM(nn.Module):
    """Bottleneck Attention Module (Park et al., 2018): y = x * (1 + sigmoid(Mc op Ms)).

    combine="product" is the authors' code (Mc * Ms), "sum" the paper's (Mc + Ms); both use the
    authors' layer structure (BN + ReLU after hidden layers, none on the branch outputs)."""

    def __init__(self, channels, reduction=16, *, dilation=4, num_dilated=2, combine="product"):
        super().__init__()
        if combine not in BAM_COMBINES:
            raise ValueError(f"combine must be one of {BAM_COMBINES}, got {combine!r}")
        self.channels = channels
        self.combine = combine
        self.channel = BAMChannelGate(channels, reduction)
        self.spatial = BAMSpatialGate(channels, reduction, dilation=dilation, num_dilated=num_dilated)
        self.register_load_state_dict_pre_hook(layouts.bam_hook)

    def attention(self, x):
        """The full-size M = sigmoid(Mc op Ms), broadcast to (N, C, H, W)."""
        channel = self.channel(x)[:, :, None, None]
        spatial = self.spatial(x)
        return torch.sigmoid(channel * spatial if self.combine == "product" else channel + spatial)

    def forward(self, x):
        check_input(x, self.channels, type(self).__name__)
        return x * (1 + self.attention(x))

    def extra_repr(self):
        return f"combine={self.combine!r}"

