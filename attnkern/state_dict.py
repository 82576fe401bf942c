"""State-dict layouts: attnkern's own, the authors' code (Jongchan/attention-module) and timm's.

Each module registers a load-state-dict pre-hook that rewrites the keys under its own prefix into
attnkern's layout before loading, so a checkpoint loads into a bare module or into any model that
contains one. Parents run before children: CBAM renames its two sub-gates, and each gate then
converts its own parameters.

    layout       CBAM keys                                             pooled order
    attnkern     channel.fc{1,2}.*, spatial.conv.weight, spatial.bn.*   [mean; max]
    authors      ChannelGate.mlp.{1,3}.*, SpatialGate.spatial.conv.weight,
                 SpatialGate.spatial.bn.*                              [max; mean]
    timm         channel.fc{1,2}.weight (C', C, 1, 1),
                 spatial.conv.conv.weight, spatial.conv.bn.*           [mean; max]
"""
import re

import torch

AUTHORS_CBAM = {"ChannelGate.": "channel.", "SpatialGate.": "spatial."}
AUTHORS_CHANNEL = {"mlp.1.": "fc1.", "mlp.3.": "fc2."}
AUTHORS_SPATIAL = {"spatial.bn.": "bn."}
TIMM_SPATIAL = {"conv.conv.": "conv.", "conv.bn.": "bn."}
AUTHORS_BAM = {
    "channel_att.gate_c.gate_c_fc_0.": "channel.fc1.",
    "channel_att.gate_c.gate_c_bn_1.": "channel.bn.",
    "channel_att.gate_c.gate_c_fc_final.": "channel.fc2.",
    "spatial_att.gate_s.gate_s_conv_reduce0.": "spatial.reduce.",
    "spatial_att.gate_s.gate_s_bn_reduce0.": "spatial.reduce_bn.",
    "spatial_att.gate_s.gate_s_conv_final.": "spatial.final.",
}
AUTHORS_BAM_DILATED = re.compile(r"spatial_att\.gate_s\.gate_s_(conv|bn)_di_(\d+)\.")


def _local_keys(state_dict, prefix):
    return [k for k in state_dict if k.startswith(prefix)]


def _rename(state_dict, prefix, mapping):
    """Moves prefix+old... to prefix+new... for each (old, new) sub-prefix; returns whether any moved."""
    moved = False
    for key in _local_keys(state_dict, prefix):
        local = key[len(prefix):]
        for old, new in mapping.items():
            if local.startswith(old):
                state_dict[prefix + new + local[len(old):]] = state_dict.pop(key)
                moved = True
                break
    return moved


def _check_known(state_dict, prefix, module, allowed_roots):
    """Raises for keys under prefix that belong to no known layout (instead of loading nothing)."""
    unknown = [k for k in _local_keys(state_dict, prefix) if k[len(prefix):].split(".")[0] not in allowed_roots]
    if unknown:
        raise ValueError(
            f"unrecognised state-dict layout for {type(module).__name__} at prefix {prefix!r}: keys {unknown[:4]} "
            "match neither attnkern's layout nor the authors' code nor timm's"
        )


def cbam_hook(module, state_dict, prefix, *_):
    _rename(state_dict, prefix, AUTHORS_CBAM)
    _check_known(state_dict, prefix, module, {"channel", "spatial"})


def channel_gate_hook(module, state_dict, prefix, *_):
    """ChannelGate and SE: authors' mlp.{1,3} -> fc{1,2}; timm's 1x1 convs -> Linear weights,
    with zero biases where timm has none and the module has them."""
    _rename(state_dict, prefix, AUTHORS_CHANNEL)
    _check_known(state_dict, prefix, module, {"fc1", "fc2"})
    for name in ("fc1", "fc2"):
        key = f"{prefix}{name}.weight"
        weight = state_dict.get(key)
        if weight is None:
            continue
        if weight.dim() == 4 and weight.shape[2:] == (1, 1):
            state_dict[key] = weight = weight.flatten(1)
            layer = getattr(module, name)
            if layer.bias is not None and f"{prefix}{name}.bias" not in state_dict:
                state_dict[f"{prefix}{name}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
        expected = tuple(getattr(module, name).weight.shape)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"{type(module).__name__} at prefix {prefix!r}: {name}.weight has shape {tuple(weight.shape)}, "
                f"the module expects {expected} (hidden width = channels // reduction; timm rounds "
                "channels / reduction instead, so its weights load only where the widths agree)"
            )


def spatial_gate_hook(module, state_dict, prefix, *_):
    """Authors' spatial.{conv,bn} with [max; mean] order -> conv/bn in [mean; max]; timm's conv.{conv,bn}."""
    authors_conv = f"{prefix}spatial.conv.weight"
    if authors_conv in state_dict:
        state_dict[f"{prefix}conv.weight"] = state_dict.pop(authors_conv)[:, [1, 0]]
        _rename(state_dict, prefix, AUTHORS_SPATIAL)
    _rename(state_dict, prefix, TIMM_SPATIAL)
    _check_known(state_dict, prefix, module, {"conv", "bn"})


def bam_hook(module, state_dict, prefix, *_):
    _rename(state_dict, prefix, AUTHORS_BAM)
    for key in _local_keys(state_dict, prefix):
        match = AUTHORS_BAM_DILATED.match(key[len(prefix):])
        if match:
            kind, index = match.groups()
            new = f"spatial.dilated.{index}." if kind == "conv" else f"spatial.dilated_bn.{index}."
            state_dict[prefix + new + key[len(prefix) + match.end():]] = state_dict.pop(key)
    _check_known(state_dict, prefix, module, {"channel", "spatial"})
