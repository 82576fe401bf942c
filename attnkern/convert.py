"""convert_model: swap every CBAM / BAM / SE module inside a model for attnkern's fused one.

    model = attnkern.convert_model(model, backend="auto")

Recognised (by class name and structure, so that neither timm nor the authors' code is imported):
    attnkern.reference  CBAM, SE, BAM, ChannelGate, SpatialGate
    authors' code       CBAM (ChannelGate.mlp + SpatialGate.spatial), BAM (channel_att.gate_c +
                        spatial_att.gate_s)                      -- Jongchan/attention-module
    timm                CbamModule (channel.fc1/fc2 1x1 convs, spatial.conv.conv/bn), SEModule
    torchvision         SqueezeExcitation (fc1/fc2 1x1 convs, ReLU, Sigmoid)
The weights move through load_state_dict, whose pre-hooks convert the layouts (the authors'
[max; mean] conv order included). Each new module gets the old one's train/eval mode, device,
dtype, BatchNorm eps and momentum (timm's spatial BN uses 0.1, the authors' 0.01) and, where all
of the old module's parameters agree, its requires_grad. A module whose variant the fused ones
cannot express (another activation or gate, 'lp'/'lse' pooling, timm's Light* modules, a hidden
width no integer reduction gives, ...) is left as it is, with a warning. Fused BAM needs
attnkern.BAM; without it BAM modules stay as they are, with a warning.
Like nn.SyncBatchNorm.convert_sync_batchnorm, the model is changed in place and returned (a
model that is itself an attention module is returned converted).
"""
import warnings

import torch
from torch import nn

from attnkern import reference

__all__ = ["convert_model", "fused_equivalent"]


class _Skip(Exception):
    """The module is an attention module, but one the fused modules cannot express."""


def _name(module):
    return type(module).__name__


def _is_relu(module):
    return isinstance(module, nn.ReLU) or _name(module) == "ReLU"


def _is_sigmoid(module):
    return isinstance(module, nn.Sigmoid) or _name(module) == "Sigmoid"


def _is_identity(module):
    return module is None or isinstance(module, nn.Identity) or _name(module) == "Identity"


def _reduction_for(channels, hidden):
    """The integer r with channels // r == hidden, or raise _Skip."""
    if hidden <= 0 or hidden > channels:
        raise _Skip(f"hidden width {hidden} for {channels} channels")
    r = channels // hidden
    if channels // r != hidden:
        raise _Skip(f"no integer reduction gives hidden width {hidden} from {channels} channels (channels // r)")
    return r


def _check_1x1(conv):
    if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1) or conv.groups != 1 or conv.stride != (1, 1):
        raise _Skip(f"expected a 1x1 Conv2d, got {conv!r}")


def _spatial_conv_config(conv, bn):
    """kernel size of a spatial-gate conv [+ BN]; checks it is the CBAM form."""
    if not isinstance(conv, nn.Conv2d) or conv.in_channels != 2 or conv.out_channels != 1:
        raise _Skip(f"expected a Conv2d(2, 1, k) spatial conv, got {conv!r}")
    k = conv.kernel_size[0]
    if (conv.kernel_size != (k, k) or k % 2 == 0 or conv.stride != (1, 1) or conv.dilation != (1, 1)
            or conv.padding != (k // 2, k // 2) or conv.groups != 1):
        raise _Skip(f"spatial conv is not a 'same' k x k conv: {conv!r}")
    if bn is not None:
        if not isinstance(bn, nn.BatchNorm2d) or not bn.affine or not bn.track_running_stats:
            raise _Skip(f"spatial norm is not an affine BatchNorm2d with running stats: {bn!r}")
        if conv.bias is not None:
            raise _Skip("spatial conv with both a bias and a BatchNorm")
        act = getattr(bn, "act", None)  # timm's BatchNormAct2d
        if not _is_identity(act) or not _is_identity(getattr(bn, "drop", None)):
            raise _Skip("spatial BatchNorm with an activation")
    elif conv.bias is None:
        raise _Skip("spatial conv without BatchNorm and without bias")
    return k


# --- recognisers: module -> (kind, kwargs) of the equivalent reference module --------------------

def _from_reference(module):
    if isinstance(module, reference.CBAM):
        ch = module.channel
        sp = module.spatial
        return "CBAM", dict(
            channels=module.channels, reduction=_reduction_for(module.channels, ch.fc1.out_features),
            kernel_size=sp.kernel_size if sp is not None else 7, pool_types=ch.pool_types,
            spatial=sp is not None, mlp_bias=ch.fc1.bias is not None,
            spatial_norm=sp.bn is not None if sp is not None else True,
        )
    if isinstance(module, reference.SE):
        return "SE", dict(
            channels=module.channels, reduction=_reduction_for(module.channels, module.fc1.out_features),
            bias=module.fc1.bias is not None,
        )
    if isinstance(module, reference.ChannelGate):
        return "ChannelGate", dict(
            channels=module.channels, reduction=_reduction_for(module.channels, module.fc1.out_features),
            pool_types=module.pool_types, bias=module.fc1.bias is not None,
        )
    if isinstance(module, reference.SpatialGate):
        return "SpatialGate", dict(kernel_size=module.kernel_size, norm=module.bn is not None)
    if isinstance(module, reference.BAM):
        return "BAM", dict(
            channels=module.channels,
            reduction=_reduction_for(module.channels, module.channel.fc1.out_features),
            dilation=module.spatial.dilation, num_dilated=len(module.spatial.dilated), combine=module.combine,
        )
    return None


def _from_authors_cbam(module):
    gate = getattr(module, "ChannelGate", None)
    mlp = getattr(gate, "mlp", None)
    if not isinstance(mlp, nn.Sequential):
        return None
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    acts = [m for m in mlp if not isinstance(m, nn.Linear) and _name(m) != "Flatten"]
    if len(linears) != 2 or len(acts) != 1 or not _is_relu(acts[0]):
        raise _Skip("authors' CBAM MLP is not Linear-ReLU-Linear")
    fc1, fc2 = linears
    pool_types = tuple(getattr(gate, "pool_types", ("avg", "max")))
    if any(p not in ("avg", "max") for p in pool_types) or len(set(pool_types)) != len(pool_types):
        raise _Skip(f"pool types {pool_types} (only avg and max are fused)")
    channels = fc1.in_features
    no_spatial = bool(getattr(module, "no_spatial", False)) or getattr(module, "SpatialGate", None) is None
    kernel_size, norm = 7, True
    if not no_spatial:
        basic = getattr(module.SpatialGate, "spatial", None)
        conv, bn = getattr(basic, "conv", None), getattr(basic, "bn", None)
        if getattr(basic, "relu", None) is not None:
            raise _Skip("authors' spatial BasicConv with a ReLU")
        kernel_size, norm = _spatial_conv_config(conv, bn), bn is not None
    return "CBAM", dict(
        channels=channels, reduction=_reduction_for(channels, fc1.out_features), kernel_size=kernel_size,
        pool_types=pool_types, spatial=not no_spatial, mlp_bias=fc1.bias is not None, spatial_norm=norm,
    )


def _from_authors_bam(module):
    gate_c = getattr(getattr(module, "channel_att", None), "gate_c", None)
    gate_s = getattr(getattr(module, "spatial_att", None), "gate_s", None)
    if not isinstance(gate_c, nn.Sequential) or not isinstance(gate_s, nn.Sequential):
        return None
    names_c = [n for n, _ in gate_c.named_children()]
    expected_c = ["flatten", "gate_c_fc_0", "gate_c_bn_1", "gate_c_relu_1", "gate_c_fc_final"]
    if names_c != expected_c:
        raise _Skip(f"authors' BAM channel gate with layers {names_c} (one hidden layer is fused)")
    fc0 = gate_c.gate_c_fc_0
    channels, hidden = fc0.in_features, fc0.out_features
    dilated = [n for n, _ in gate_s.named_children() if n.startswith("gate_s_conv_di_")]
    if not dilated or not hasattr(gate_s, "gate_s_conv_reduce0"):
        raise _Skip("authors' BAM spatial gate without the expected layers")
    dilation = getattr(gate_s, dilated[0]).dilation[0]
    for n in dilated:
        conv = getattr(gate_s, n)
        if conv.kernel_size != (3, 3) or conv.dilation != (dilation, dilation) or conv.padding != (dilation, dilation):
            raise _Skip(f"authors' BAM dilated conv {n} is not 3x3 with padding = dilation = {dilation}")
    if gate_s.gate_s_conv_reduce0.out_channels != hidden:
        raise _Skip("authors' BAM branches with different hidden widths")
    return "BAM", dict(
        channels=channels, reduction=_reduction_for(channels, hidden), dilation=dilation,
        num_dilated=len(dilated), combine="product",
    )


def _timm_channel(channel):
    fc1, fc2 = getattr(channel, "fc1", None), getattr(channel, "fc2", None)
    _check_1x1(fc1)
    _check_1x1(fc2)
    if not _is_relu(getattr(channel, "act", None)) or not _is_sigmoid(getattr(channel, "gate", None)):
        raise _Skip("timm channel attention with an activation other than ReLU or a gate other than sigmoid")
    if (fc1.bias is None) != (fc2.bias is None):
        raise _Skip("timm channel attention with a bias on one layer only")
    return fc1.in_channels, fc1.out_channels, fc1.bias is not None


def _from_timm_cbam(module):
    channel, spatial = getattr(module, "channel", None), getattr(module, "spatial", None)
    if _name(channel) != "ChannelAttn" or _name(spatial) != "SpatialAttn":
        raise _Skip(f"timm {_name(module)} with {_name(channel)} / {_name(spatial)} (Light variants are not fused)")
    channels, hidden, bias = _timm_channel(channel)
    if not _is_sigmoid(getattr(spatial, "gate", None)):
        raise _Skip("timm spatial attention with a gate other than sigmoid")
    conv_norm_act = spatial.conv
    bn = getattr(conv_norm_act, "bn", None)
    if bn is not None and _is_identity(bn):
        bn = None
    kernel_size = _spatial_conv_config(conv_norm_act.conv, bn)
    return "CBAM", dict(
        channels=channels, reduction=_reduction_for(channels, hidden), kernel_size=kernel_size,
        pool_types=("avg", "max"), spatial=True, mlp_bias=bias, spatial_norm=bn is not None,
    )


def _from_se_conv(module):
    """timm's SEModule and torchvision's SqueezeExcitation: avg pool, 1x1 conv, ReLU, 1x1 conv, sigmoid."""
    if getattr(module, "add_maxpool", False):
        raise _Skip("SE with add_maxpool")
    if not _is_identity(getattr(module, "bn", None)):
        raise _Skip("SE with a norm layer between its convs")
    act = getattr(module, "act", getattr(module, "activation", None))
    gate = getattr(module, "gate", getattr(module, "scale_activation", None))
    fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
    _check_1x1(fc1)
    _check_1x1(fc2)
    if not _is_relu(act) or not _is_sigmoid(gate):
        raise _Skip("SE with an activation other than ReLU or a gate other than sigmoid")
    if (fc1.bias is None) != (fc2.bias is None):
        raise _Skip("SE with a bias on one layer only")
    channels, hidden = fc1.in_channels, fc1.out_channels
    return "SE", dict(channels=channels, reduction=_reduction_for(channels, hidden), bias=fc1.bias is not None)


_BY_NAME = {
    "CBAM": _from_authors_cbam,
    "BAM": _from_authors_bam,
    "CbamModule": _from_timm_cbam,
    "LightCbamModule": _from_timm_cbam,
    "SEModule": _from_se_conv,
    "SqueezeExcite": _from_se_conv,
    "SqueezeExcitation": _from_se_conv,
}


def _recognise(module):
    """(kind, kwargs) of the fused equivalent, None for other modules; raises _Skip for variants
    the fused modules cannot express."""
    found = _from_reference(module)
    if found is not None:
        return found
    recogniser = _BY_NAME.get(_name(module))
    return recogniser(module) if recogniser is not None else None


def _fused_class(kind):
    import attnkern

    cls = getattr(attnkern, kind, None)
    if cls is None:
        raise _Skip(f"attnkern.{kind} (the fused module) is not available in this build")
    return cls


def _construct(kind, kwargs, backend):
    cls = _fused_class(kind)
    kwargs = dict(kwargs)
    if kind == "SpatialGate":
        return cls(kwargs.pop("kernel_size"), **kwargs, backend=backend)
    channels, reduction = kwargs.pop("channels"), kwargs.pop("reduction")
    if kind == "CBAM":
        return cls(channels, reduction, kwargs.pop("kernel_size"), **kwargs, backend=backend)
    return cls(channels, reduction, **kwargs, backend=backend)


def _batchnorms(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _device_dtype(module):
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    for t in module.buffers():
        return t.device, None
    return None, None


def fused_equivalent(module, backend="auto"):
    """The fused module equivalent to `module` with its weights, mode, device and dtype, or None
    when `module` is not a recognised attention module. Raises ValueError (with the reason) for
    an attention module the fused ones cannot express."""
    try:
        found = _recognise(module)
        if found is None:
            return None
        kind, kwargs = found
        new = _construct(kind, kwargs, backend)
    except _Skip as exc:
        raise ValueError(f"{_name(module)} cannot be converted: {exc}") from None
    device, dtype = _device_dtype(module)
    if device is not None:
        new.to(device=device)
    if dtype is not None:
        new.to(dtype=dtype)
    # Parameters and buffers: the load pre-hooks convert the authors' and timm's layouts.
    new.load_state_dict(module.state_dict(), strict=True)
    old_bns, new_bns = _batchnorms(module), _batchnorms(new)
    if len(old_bns) == len(new_bns):  # same order in every layout: see the recognisers
        for old, fresh in zip(old_bns, new_bns):
            fresh.eps, fresh.momentum = old.eps, old.momentum
    new.train(module.training)
    old_modes = {m.training for m in module.modules()}
    if len(old_modes) > 1:
        warnings.warn(
            f"{_name(module)} has sub-modules in both train and eval mode; the fused module is set to "
            f"{'train' if module.training else 'eval'} mode as a whole",
            stacklevel=3,
        )
    flags = {p.requires_grad for p in module.parameters()}
    if flags == {False}:
        new.requires_grad_(False)
    return new


def convert_model(model, backend="auto"):
    """Replaces, in place, every recognised CBAM / BAM / SE module (attnkern.reference, the authors'
    code, timm, torchvision SE) inside `model` with attnkern's fused module, keeping weights, mode,
    device and dtype. Returns the model (or its replacement when `model` itself is one)."""
    from attnkern.backends import check_backend_name

    check_backend_name(backend)
    fused_types = _fused_types()

    def convert(module, path):
        if isinstance(module, fused_types):
            return module
        try:
            new = fused_equivalent(module, backend)
        except ValueError as exc:
            warnings.warn(f"convert_model: left {path or '<model>'} as it is: {exc}", stacklevel=3)
            new = None
        if new is not None:
            return new
        for name, child in list(module.named_children()):
            replaced = convert(child, f"{path}.{name}" if path else name)
            if replaced is not child:
                setattr(module, name, replaced)
        return module

    with torch.no_grad():
        return convert(model, "")


def _fused_types():
    import attnkern

    names = ("CBAM", "SE", "ChannelGate", "SpatialGate", "BAM")
    return tuple(getattr(attnkern, n) for n in names if getattr(attnkern, n, None) is not None)
