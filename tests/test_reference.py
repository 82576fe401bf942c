"""The reference modules: equations against hand-written formulas, the variants, state-dict loading
in the three layouts (against small independent re-implementations of the authors' and timm's
forward), and bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnkern import reference


def randomize(module):
    """Random parameters and BN statistics, so no check passes on an init-time zero or one."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
        for name, b in module.named_buffers():
            if "running_var" in name:
                b.uniform_(0.5, 2.0)
            elif "running_mean" in name:
                b.normal_()
    return module


# ---- equations ---------------------------------------------------------------------------------

def cbam_formula(x, w1, b1, w2, b2, conv_w, bn, pool_types=("avg", "max")):
    """Woo et al. eq. 1-3 written out with einsum and explicit loops over pool types."""
    def mlp(v):
        h = torch.einsum("hc,nc->nh", w1, v) + (b1 if b1 is not None else 0)
        return torch.einsum("ch,nh->nc", w2, h.clamp(min=0)) + (b2 if b2 is not None else 0)
    pools = {"avg": x.mean(dim=(2, 3)), "max": x.amax(dim=(2, 3))}
    mc = torch.sigmoid(sum(mlp(pools[p]) for p in pool_types))
    x1 = x * mc[:, :, None, None]
    if conv_w is None:
        return x1
    maps = torch.stack([x1.mean(dim=1), x1.amax(dim=1)], dim=1)
    k = conv_w.shape[-1]
    padded = F.pad(maps, (k // 2,) * 4)
    s = torch.zeros(x.shape[0], x.shape[2], x.shape[3], dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            s += torch.einsum("c,nchw->nhw", conv_w[0, :, i, j], padded[:, :, i:i + x.shape[2], j:j + x.shape[3]])
    if bn is not None:
        s = (s - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    return x1 * torch.sigmoid(s)[:, None]


@pytest.mark.parametrize("pool_types", [("avg", "max"), ("avg",), ("max",)])
@pytest.mark.parametrize("mlp_bias", [True, False])
@pytest.mark.parametrize("kernel_size", [7, 3, 1])
def test_cbam_matches_formula(pool_types, mlp_bias, kernel_size):
    m = randomize(reference.CBAM(12, 4, kernel_size, pool_types=pool_types, mlp_bias=mlp_bias)).double().eval()
    x = torch.randn(3, 12, 7, 9, dtype=torch.float64)
    fc1, fc2 = m.channel.fc1, m.channel.fc2
    expected = cbam_formula(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, m.spatial.conv.weight, m.spatial.bn, pool_types)
    torch.testing.assert_close(m(x), expected)


def test_cbam_without_norm_has_conv_bias():
    m = randomize(reference.CBAM(8, 2, spatial_norm=False)).double()
    assert m.spatial.bn is None and m.spatial.conv.bias is not None
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    fc1, fc2 = m.channel.fc1, m.channel.fc2
    no_bias = cbam_formula(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, m.spatial.conv.weight, None)
    x1 = cbam_formula(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, None, None)
    # A bias b shifts the logits: sigmoid(s + b) = expected gate; recover s from the bias-free result.
    s = torch.logit(no_bias / x1)
    torch.testing.assert_close(m(x), x1 * torch.sigmoid(s + m.spatial.conv.bias))


def test_cbam_channel_only_and_se():
    m = randomize(reference.CBAM(16, 4, spatial=False)).double()
    assert m.spatial is None
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    c = m.channel
    torch.testing.assert_close(m(x), cbam_formula(x, c.fc1.weight, c.fc1.bias, c.fc2.weight, c.fc2.bias, None, None))
    se = randomize(reference.SE(16, 4)).double()
    assert se.fc1.bias is None and se.pool_types == ("avg",)
    gate = torch.sigmoid(se.fc2.weight @ torch.relu(se.fc1.weight @ x.mean(dim=(2, 3)).T)).T
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])


def test_cbam_training_bn_uses_batch_stats_and_updates_running():
    m = randomize(reference.CBAM(8, 2)).double().train()
    bn = m.spatial.bn
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    m(torch.randn(4, 8, 6, 6, dtype=torch.float64))
    assert bn.momentum == 0.01 and bn.num_batches_tracked.item() == 1
    assert not torch.equal(bn.running_mean, mean0) and not torch.equal(bn.running_var, var0)


def test_spatial_pool_order_is_mean_then_max():
    m = reference.SpatialGate(1).double()
    with torch.no_grad():
        m.conv.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
        m.bn.weight.fill_(1.0)
        m.bn.bias.zero_()
    m.eval()
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x), x * torch.sigmoid(x.mean(dim=1, keepdim=True) / (1 + 1e-5) ** 0.5))


@pytest.mark.parametrize("combine", ["product", "sum"])
@pytest.mark.parametrize("num_dilated,dilation", [(2, 4), (1, 2), (0, 4)])
def test_bam_matches_formula(combine, num_dilated, dilation):
    m = randomize(reference.BAM(32, 8, dilation=dilation, num_dilated=num_dilated, combine=combine)).double().eval()
    x = torch.randn(2, 32, 9, 13, dtype=torch.float64)

    def bn(v, layer):
        shape = (1, -1) + (1,) * (v.dim() - 2)
        return (v - layer.running_mean.view(shape)) / torch.sqrt(layer.running_var.view(shape) + layer.eps) * layer.weight.view(shape) + layer.bias.view(shape)

    c = m.channel
    mc = c.fc2.weight @ torch.relu(bn(x.mean(dim=(2, 3)) @ c.fc1.weight.T + c.fc1.bias, c.bn)).T
    mc = mc.T + c.fc2.bias
    s = m.spatial
    h = torch.relu(bn(torch.einsum("kc,nchw->nkhw", s.reduce.weight[:, :, 0, 0], x) + s.reduce.bias.view(1, -1, 1, 1), s.reduce_bn))
    for conv, layer in zip(s.dilated, s.dilated_bn):
        h = torch.relu(bn(F.conv2d(h, conv.weight, conv.bias, padding=dilation, dilation=dilation), layer))
    ms = torch.einsum("kc,nchw->nkhw", s.final.weight[:, :, 0, 0], h) + s.final.bias.view(1, -1, 1, 1)
    a = mc[:, :, None, None] * ms if combine == "product" else mc[:, :, None, None] + ms
    torch.testing.assert_close(m(x), x * (1 + torch.sigmoid(a)))


def test_bam_global_pool_is_correct_for_non_square_inputs():
    """The authors' avg_pool2d(kernel=H) pools only the first H columns when W > H; ours pools all."""
    m = reference.BAMChannelGate(8, 2).double().eval()
    x = torch.zeros(1, 8, 2, 6, dtype=torch.float64)
    x[..., 4:] = 5.0  # only in columns the authors' pool would miss
    with torch.no_grad():
        m.fc1.weight.copy_(torch.eye(4, 8))
        m.fc1.bias.zero_()
    pooled = m.fc1(x.mean(dim=(2, 3)))
    assert pooled[0, 0].item() == pytest.approx(5.0 / 3)


# ---- state-dict layouts --------------------------------------------------------------------------

class AuthorsCBAM(nn.Module):
    """The authors' CBAM forward (MODELS/cbam.py), independently re-written with their module names."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = channels // reduction
        self.ChannelGate = nn.Module()
        self.ChannelGate.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        self.SpatialGate = nn.Module()
        self.SpatialGate.spatial = nn.Module()
        self.SpatialGate.spatial.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.SpatialGate.spatial.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x):
        mlp = self.ChannelGate.mlp
        avg = F.avg_pool2d(x, (x.size(2), x.size(3)))
        mx = F.max_pool2d(x, (x.size(2), x.size(3)))
        x = x * torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None]
        compressed = torch.cat([torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)], dim=1)
        s = self.SpatialGate.spatial
        return x * torch.sigmoid(s.bn(s.conv(compressed)))


class TimmCBAM(nn.Module):
    """timm's CbamModule forward (layers/cbam.py), re-written with its module names."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.channel = nn.Module()
        self.channel.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.channel.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.spatial = nn.Module()
        self.spatial.conv = nn.Module()
        self.spatial.conv.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.spatial.conv.bn = nn.BatchNorm2d(1)

    def forward(self, x):
        c = self.channel
        avg = c.fc2(F.relu(c.fc1(x.mean((2, 3), keepdim=True))))
        mx = c.fc2(F.relu(c.fc1(x.amax((2, 3), keepdim=True))))
        x = x * torch.sigmoid(avg + mx)
        attn = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial.conv.bn(self.spatial.conv.conv(attn)))


class AuthorsBAM(nn.Module):
    """The authors' BAM forward (MODELS/bam.py) with their module names, pooling fixed for H != W."""

    def __init__(self, channels, reduction=16, dilation=4):
        super().__init__()
        hidden = channels // reduction
        self.channel_att = nn.Module()
        self.channel_att.gate_c = nn.Sequential()
        gc = self.channel_att.gate_c
        gc.add_module("flatten", nn.Flatten())
        gc.add_module("gate_c_fc_0", nn.Linear(channels, hidden))
        gc.add_module("gate_c_bn_1", nn.BatchNorm1d(hidden))
        gc.add_module("gate_c_relu_1", nn.ReLU())
        gc.add_module("gate_c_fc_final", nn.Linear(hidden, channels))
        self.spatial_att = nn.Module()
        self.spatial_att.gate_s = nn.Sequential()
        gs = self.spatial_att.gate_s
        gs.add_module("gate_s_conv_reduce0", nn.Conv2d(channels, hidden, 1))
        gs.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(hidden))
        gs.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(2):
            gs.add_module(f"gate_s_conv_di_{i}", nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation))
            gs.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(hidden))
            gs.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        gs.add_module("gate_s_conv_final", nn.Conv2d(hidden, 1, 1))

    def forward(self, x):
        channel = self.channel_att.gate_c(x.mean(dim=(2, 3), keepdim=True))[:, :, None, None]
        spatial = self.spatial_att.gate_s(x)
        return x * (1 + torch.sigmoid(channel * spatial))


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "nested"])
def test_cbam_loads_authors_layout(wrapped):
    theirs = randomize(AuthorsCBAM(32, 8)).double().eval()
    ours = reference.CBAM(32, 8).double().eval()
    if wrapped:  # inside a model: keys carry a prefix
        holder = nn.Sequential(nn.Identity(), ours)
        holder.load_state_dict({f"1.{k}": v for k, v in theirs.state_dict().items()})
    else:
        ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 32, 7, 11, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))


def test_cbam_loads_timm_layout():
    theirs = randomize(TimmCBAM(32, 2)).double().eval()
    ours = reference.CBAM(32, 16, mlp_bias=False).double().eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 32, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))
    # With MLP biases in the module, timm's missing biases load as zero.
    biased = reference.CBAM(32, 16).double().eval()
    biased.load_state_dict(theirs.state_dict())
    assert biased.channel.fc1.bias.abs().sum() == 0
    torch.testing.assert_close(biased(x), theirs(x))


def test_timm_width_mismatch_is_a_clear_error():
    theirs = TimmCBAM(40, 3)  # timm: round(40 / 16) = 3; ours: 40 // 16 = 2
    with pytest.raises(ValueError, match="hidden width"):
        reference.CBAM(40, 16, mlp_bias=False).load_state_dict(theirs.state_dict())


def test_own_layout_round_trips():
    a = randomize(reference.CBAM(16, 4)).double()
    b = reference.CBAM(16, 4).double()
    b.load_state_dict(a.state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_bam_loads_authors_layout():
    theirs = randomize(AuthorsBAM(32, 8)).double().eval()
    ours = reference.BAM(32, 8).double().eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 32, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))


def test_unknown_layout_is_rejected():
    with pytest.raises(ValueError, match="unrecognised state-dict layout"):
        reference.CBAM(16, 4).load_state_dict({"gate.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unrecognised state-dict layout"):
        reference.BAM(16, 4).load_state_dict({"foo.bar": torch.zeros(1)})


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: reference.CBAM(8, 16), "no hidden unit"),
        (lambda: reference.CBAM(8, 0), "reduction"),
        (lambda: reference.CBAM(0), "channels"),
        (lambda: reference.CBAM(8, 2, kernel_size=4), "odd"),
        (lambda: reference.CBAM(8, 2, kernel_size=-3), "odd"),
        (lambda: reference.CBAM(8, 2, pool_types=("avg", "lse")), "pool_types"),
        (lambda: reference.CBAM(8, 2, pool_types=()), "pool_types"),
        (lambda: reference.SE(4, 8), "no hidden unit"),
        (lambda: reference.BAM(8, 16), "no hidden unit"),
        (lambda: reference.BAM(32, combine="mul"), "combine"),
        (lambda: reference.BAM(32, dilation=0), "dilation"),
    ],
)
def test_bad_configuration(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("module", [lambda: reference.CBAM(8, 2), lambda: reference.SE(8, 2), lambda: reference.BAM(8, 2)])
def test_bad_input(module):
    check_rejects_bad_input(module())


def check_rejects_bad_input(m):
    """m expects 8 channels: wrong rank, channel count and dtype each get an exception naming them."""
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(8, 5, 5))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 6, 5, 5))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(2, 8, 5, 5, dtype=torch.long))
