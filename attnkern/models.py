"""ResNet-18/34/50/101 with CBAM, BAM or SE, laid out like the authors' code so their checkpoints load.

    resnet50(attention="cbam" | "bam" | "se" | None, fused=True, num_classes=1000, backend="auto")

Layout (names of Jongchan/attention-module, MODELS/model_resnet.py):
    conv1, bn1, [bam1], layer1, [bam2], layer2, [bam3], layer3, layer4, fc
    blocks: conv1, bn1, conv2, bn2, (conv3, bn3), downsample.0 (conv), downsample.1 (BN),
            cbam (CBAM) or se (SE) after the last BN, before the residual add
- CBAM / SE sit in every block and take the block's output width (planes * expansion).
- BAM sits after stages 1, 2, 3 and takes that stage's output width (64/128/256 * expansion).
- fused=True builds attnkern.CBAM / SE / BAM (with `backend`), fused=False the modules of
  attnkern.reference; both have the same parameters and state dict, and each attention module's
  load pre-hook converts the authors' (and timm's) key layout, so `load_authors_checkpoint`
  only has to strip DataParallel's `module.` prefix.
- Differences from the authors' code, none of which changes a parameter: the global pool is
  adaptive (their AvgPool2d(7) equals it at 224x224 and needs exactly 7x7 maps; this accepts any
  size), and stem="cifar" gives their CIFAR stem (3x3 conv, no max pool).
- Initialisation follows theirs (see `init_like_authors`): Kaiming-normal (fan_out) convolutions,
  BN weight 1 / bias 0, every bias 0, and CBAM's spatial BN weight 0 so that its spatial gate
  starts as a constant sigmoid(0) = 0.5.

SE is not in the authors' code: its blocks follow Hu et al. (SE after the last BN, before the add,
reduction 16, no MLP bias), under the name `se`.
"""
import collections
import os

import torch
from torch import nn

from attnkern import modules as fused_modules
from attnkern import reference

__all__ = [
    "ATTENTIONS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "build_resnet",
    "init_like_authors",
    "load_authors_checkpoint",
    "strip_module_prefix",
]

ATTENTIONS = (None, "cbam", "bam", "se")
REDUCTION = 16
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def attention_factory(kind, fused, backend="auto"):
    """A function channels -> attention module (or None for kind None)."""
    if kind is None:
        return None
    if kind not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {kind!r}")
    if not fused:
        classes = {"cbam": reference.CBAM, "se": reference.SE, "bam": reference.BAM}
        return lambda channels: classes[kind](channels, REDUCTION)
    classes = {"cbam": fused_modules.CBAM, "se": fused_modules.SE, "bam": fused_modules.BAM}
    return lambda channels: classes[kind](channels, REDUCTION, backend=backend)


def _conv3x3(inplanes, planes, stride=1):
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class _Block(nn.Module):
    expansion = 1

    def _attach_attention(self, attention, block_attention, channels):
        """Registers the in-block attention as `cbam` (CBAM, as in the authors' code) or `se`."""
        self.cbam = None
        self.se = None
        if block_attention is not None:
            setattr(self, "se" if attention == "se" else "cbam", block_attention(channels))

    def _attend(self, out):
        if self.cbam is not None:
            out = self.cbam(out)
        if self.se is not None:
            out = self.se(out)
        return out


class BasicBlock(_Block):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, attention=None, block_attention=None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self._attach_attention(attention, block_attention, planes * self.expansion)

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self._attend(out)
        return self.relu(out + residual)


class Bottleneck(_Block):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, attention=None, block_attention=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)  # stride on the 3x3, as in the authors' code
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._attach_attention(attention, block_attention, planes * self.expansion)

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self._attend(out)
        return self.relu(out + residual)


class ResNet(nn.Module):
    """The authors' ResidualNet. `block` is BasicBlock or Bottleneck, `layers` the blocks per stage."""

    def __init__(self, block, layers, num_classes=1000, attention=None, fused=True, backend="auto", stem="imagenet"):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.attention = attention
        self.fused = fused
        self.stem = stem
        make = attention_factory(attention, fused, backend)
        block_attention = make if attention in ("cbam", "se") else None
        self.inplanes = 64
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = None
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        if attention == "bam":
            self.bam1 = make(64 * block.expansion)
            self.bam2 = make(128 * block.expansion)
            self.bam3 = make(256 * block.expansion)
        else:
            self.bam1 = self.bam2 = self.bam3 = None
        self.layer1 = self._make_layer(block, 64, layers[0], 1, attention, block_attention)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, attention, block_attention)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, attention, block_attention)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, attention, block_attention)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_like_authors(self)

    def _make_layer(self, block, planes, blocks, stride, attention, block_attention):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, attention, block_attention)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, attention, block_attention) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        x = self.layer1(x)
        if self.bam1 is not None:
            x = self.bam1(x)
        x = self.layer2(x)
        if self.bam2 is not None:
            x = self.bam2(x)
        x = self.layer3(x)
        if self.bam3 is not None:
            x = self.bam3(x)
        return self.layer4(x)

    def forward(self, x):
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


@torch.no_grad()
def init_like_authors(model):
    """The authors' initialisation, which they apply by state-dict key name; here by module:
    - every Conv2d weight: kaiming_normal_(mode="fan_out") (gain sqrt(2)), including the attention
      modules' convolutions, except the downsample shortcut convs, whose key ("downsample.0.weight")
      their rule does not match and which keep PyTorch's default init;
    - fc weight: kaiming_normal_ (fan_in); the attention MLPs' Linear weights keep the default;
    - every BatchNorm: weight 1, bias 0, except CBAM's spatial-gate BN, whose weight is 0;
    - every bias: 0."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and not name.endswith("downsample.0"):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            module.weight.fill_(1.0)
        if getattr(module, "bias", None) is not None and isinstance(module.bias, torch.Tensor):
            module.bias.zero_()
    if isinstance(getattr(model, "fc", None), nn.Linear):
        nn.init.kaiming_normal_(model.fc.weight)
    for module in model.modules():
        if isinstance(module, reference.SpatialGate) and module.bn is not None and module.bn.affine:
            module.bn.weight.zero_()


def build_resnet(depth, attention=None, fused=True, num_classes=1000, backend="auto", stem="imagenet"):
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth!r}")
    kind, layers = DEPTHS[depth]
    block = BasicBlock if kind == "basic" else Bottleneck
    return ResNet(block, layers, num_classes, attention, fused, backend, stem)


def resnet18(attention=None, fused=True, num_classes=1000, backend="auto", stem="imagenet"):
    return build_resnet(18, attention, fused, num_classes, backend, stem)


def resnet34(attention=None, fused=True, num_classes=1000, backend="auto", stem="imagenet"):
    return build_resnet(34, attention, fused, num_classes, backend, stem)


def resnet50(attention=None, fused=True, num_classes=1000, backend="auto", stem="imagenet"):
    return build_resnet(50, attention, fused, num_classes, backend, stem)


def resnet101(attention=None, fused=True, num_classes=1000, backend="auto", stem="imagenet"):
    return build_resnet(101, attention, fused, num_classes, backend, stem)


for _f, _d in ((resnet18, 18), (resnet34, 34), (resnet50, 50), (resnet101, 101)):
    _f.__doc__ = (
        f"ResNet-{_d}; attention None / 'cbam' (every block) / 'se' (every block) / 'bam' (after stages "
        "1-3); fused=True for attnkern's modules (run by `backend`), False for attnkern.reference's."
    )


def strip_module_prefix(state_dict, prefix="module."):
    """A copy of state_dict with a leading `prefix` (DataParallel's `module.`) removed from each key."""
    out = collections.OrderedDict()
    for key, value in state_dict.items():
        out[key[len(prefix):] if key.startswith(prefix) else key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # per-module versions (BatchNorm's, ...), keyed by module path
        root = prefix[:-1] if prefix.endswith(".") else prefix
        stripped = type(metadata)()
        for key, value in metadata.items():
            if key == root:
                stripped[""] = value
            elif key.startswith(prefix):
                stripped[key[len(prefix):]] = value
            else:
                stripped.setdefault(key, value)
        out._metadata = stripped
    return out


def load_authors_checkpoint(model, state_dict_or_path, strict=True, weights_only=True):
    """Loads a checkpoint of the authors' code (Jongchan/attention-module) into `model`.

    Accepts a state dict, a training checkpoint (a dict holding it under "state_dict", as
    train_imagenet.py saves) or a path to either. DataParallel's `module.` prefix is stripped;
    the attention modules' load pre-hooks convert the authors' CBAM / BAM key layout (and
    CBAM's [max; mean] conv order). Checkpoints without `num_batches_tracked` (PyTorch < 0.4.1)
    load: BatchNorm fills it in. Returns load_state_dict's result (missing / unexpected keys)."""
    state = state_dict_or_path
    if isinstance(state, (str, os.PathLike)):
        state = torch.load(state, map_location="cpu", weights_only=weights_only)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TypeError(f"expected a state dict, a checkpoint dict with 'state_dict', or a path; got {type(state).__name__}")
    return model.load_state_dict(strip_module_prefix(state), strict=strict)
