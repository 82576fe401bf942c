"""ResNet builders (attnkern.models) and convert_model (attnkern.convert).

The authors' (Jongchan/attention-module), timm's and torchvision's modules are mimicked by small
stand-in classes below with the same class names, attribute structure and forward semantics, so
that neither package is needed."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnkern
from attnkern import models, reference
from attnkern.convert import convert_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = dict(rtol=1e-7, atol=1e-9)  # float64 throughout


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one thread is faster, and immune to a busy machine's scheduling."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def randomize(model, seed=0):
    """Random values for every parameter and BN buffer, so that equalities are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5)
            elif name.endswith("weight") and t.dim() == 1:  # norm weights
                t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.2)
    return model


# --- stand-ins for the authors' code (MODELS/cbam.py, MODELS/bam.py) ------------------------------

class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class BasicConv(nn.Module):
    def __init__(self, cin, cout, k, padding):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.01)
        self.relu = None

    def forward(self, x):
        return self.bn(self.conv(x))


class AuthorsChannelGate(nn.Module):
    def __init__(self, channels, reduction=16, pool_types=("avg", "max")):
        super().__init__()
        self.gate_channels = channels
        self.mlp = nn.Sequential(Flatten(), nn.Linear(channels, channels // reduction), nn.ReLU(),
                                 nn.Linear(channels // reduction, channels))
        self.pool_types = list(pool_types)

    def forward(self, x):
        att = None
        for p in self.pool_types:
            pooled = F.avg_pool2d(x, x.shape[2:]) if p == "avg" else F.max_pool2d(x, x.shape[2:])
            raw = self.mlp(pooled)
            att = raw if att is None else att + raw
        return x * torch.sigmoid(att)[:, :, None, None]


class AuthorsSpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.spatial = BasicConv(2, 1, 7, padding=3)

    def forward(self, x):
        pooled = torch.cat([x.max(1, keepdim=True)[0], x.mean(1, keepdim=True)], dim=1)  # [max; mean]
        return x * torch.sigmoid(self.spatial(pooled))


AuthorsChannelGate.__name__ = "ChannelGate"
AuthorsSpatialGate.__name__ = "SpatialGate"


class CBAM(nn.Module):  # the authors' class name
    def __init__(self, channels, reduction=16, pool_types=("avg", "max"), no_spatial=False):
        super().__init__()
        self.ChannelGate = AuthorsChannelGate(channels, reduction, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = AuthorsSpatialGate()

    def forward(self, x):
        x = self.ChannelGate(x)
        return x if self.no_spatial else self.SpatialGate(x)


class AuthorsBamChannel(nn.Module):
    def __init__(self, c, r=16):
        super().__init__()
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("flatten", Flatten())
        self.gate_c.add_module("gate_c_fc_0", nn.Linear(c, c // r))
        self.gate_c.add_module("gate_c_bn_1", nn.BatchNorm1d(c // r))
        self.gate_c.add_module("gate_c_relu_1", nn.ReLU())
        self.gate_c.add_module("gate_c_fc_final", nn.Linear(c // r, c))

    def forward(self, x):
        return self.gate_c(F.avg_pool2d(x, x.size(2), stride=x.size(2)))[:, :, None, None].expand_as(x)


class AuthorsBamSpatial(nn.Module):
    def __init__(self, c, r=16, num=2, d=4):
        super().__init__()
        self.gate_s = nn.Sequential()
        self.gate_s.add_module("gate_s_conv_reduce0", nn.Conv2d(c, c // r, 1))
        self.gate_s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(c // r))
        self.gate_s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(num):
            self.gate_s.add_module(f"gate_s_conv_di_{i}", nn.Conv2d(c // r, c // r, 3, padding=d, dilation=d))
            self.gate_s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(c // r))
            self.gate_s.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        self.gate_s.add_module("gate_s_conv_final", nn.Conv2d(c // r, 1, 1))

    def forward(self, x):
        return self.gate_s(x).expand_as(x)


class BAM(nn.Module):  # the authors' class name
    def __init__(self, c):
        super().__init__()
        self.channel_att = AuthorsBamChannel(c)
        self.spatial_att = AuthorsBamSpatial(c)

    def forward(self, x):
        return (1 + torch.sigmoid(self.channel_att(x) * self.spatial_att(x))) * x


# --- stand-ins for timm (layers/cbam.py, layers/squeeze_excite.py) and torchvision --------------

class ConvNormAct(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)  # timm: BatchNormAct2d with an Identity act, momentum 0.1

    def forward(self, x):
        return self.bn(self.conv(x))


class ChannelAttn(nn.Module):
    def __init__(self, c, rd, act=nn.ReLU, mlp_bias=False):
        super().__init__()
        self.fc1 = nn.Conv2d(c, rd, 1, bias=mlp_bias)
        self.act = act(inplace=True)
        self.fc2 = nn.Conv2d(rd, c, 1, bias=mlp_bias)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        a = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        m = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * self.gate(a + m)


class SpatialAttn(nn.Module):
    def __init__(self, k=7):
        super().__init__()
        self.conv = ConvNormAct(2, 1, k)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * self.gate(self.conv(pooled))


class CbamModule(nn.Module):
    def __init__(self, c, rd=None, act=nn.ReLU, mlp_bias=False):
        super().__init__()
        self.channel = ChannelAttn(c, rd or c // 16, act, mlp_bias)
        self.spatial = SpatialAttn(7)

    def forward(self, x):
        return self.spatial(self.channel(x))


class SEModule(nn.Module):
    def __init__(self, c, rd, bias=True, act=nn.ReLU):
        super().__init__()
        self.add_maxpool = False
        self.fc1 = nn.Conv2d(c, rd, 1, bias=bias)
        self.bn = nn.Identity()
        self.act = act(inplace=True)
        self.fc2 = nn.Conv2d(rd, c, 1, bias=bias)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        s = self.fc2(self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * self.gate(s)


class SqueezeExcitation(nn.Module):  # torchvision.ops.SqueezeExcitation
    def __init__(self, c, rd):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, rd, 1)
        self.fc2 = nn.Conv2d(rd, c, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


FUSED_TYPES = (attnkern.CBAM, attnkern.SE, attnkern.BAM)
UNFUSED_TYPES = (reference.CBAM, reference.SE, reference.BAM, CBAM, BAM, CbamModule, SEModule, SqueezeExcitation)


def unfused_left(model):
    return [n for n, m in model.named_modules() if isinstance(m, UNFUSED_TYPES) and not isinstance(m, FUSED_TYPES)]


# --- models -------------------------------------------------------------------------------------

def test_parameter_counts():
    """The counts of torchvision's ResNet-50 and the authors' ResNet-50 + CBAM / + BAM."""
    assert n_params(models.resnet50(None, fused=False)) == 25_557_032
    assert n_params(models.resnet50("cbam", fused=False)) == 28_089_624
    assert n_params(models.resnet50("bam", fused=False)) == 25_915_099
    assert n_params(models.resnet50("cbam", fused=True)) == 28_089_624
    assert n_params(models.resnet50("bam", fused=True)) == 25_915_099


@pytest.mark.parametrize("depth,attention", [(18, None), (18, "cbam"), (18, "se"), (18, "bam"), (34, "cbam")])
def test_output_shapes(depth, attention):
    model = models.build_resnet(depth, attention, fused=True, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
        # the authors' CIFAR stem, and a non-square input (adaptive pooling)
    cifar = models.build_resnet(depth, attention, fused=True, num_classes=5, stem="cifar").eval()
    with torch.no_grad():
        assert cifar(torch.randn(2, 3, 16, 24)).shape == (2, 5)


def test_bottleneck_output_and_training_step():
    model = models.resnet50("cbam", fused=True, num_classes=4)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 4)
    out.sum().backward()
    assert model.layer1[0].cbam.channel.fc1.weight.grad is not None
    assert model.layer4[2].cbam.spatial.conv.weight.grad is not None


def test_layout_and_placement():
    keys = models.resnet50("cbam", fused=False).state_dict().keys()
    for key in ["conv1.weight", "bn1.running_mean", "fc.weight", "fc.bias", "layer1.0.conv3.weight",
                "layer1.0.bn3.weight", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var",
                "layer1.0.cbam.channel.fc1.weight", "layer4.2.cbam.spatial.bn.weight"]:
        assert key in keys, key
    bam = models.resnet50("bam", fused=False)
    assert [bam.bam1.channels, bam.bam2.channels, bam.bam3.channels] == [256, 512, 1024]
    assert not any(".cbam." in k for k in bam.state_dict())
    r18 = models.resnet18("cbam", fused=False)
    assert r18.layer1[0].cbam.channels == 64 and r18.layer4[1].cbam.channels == 512
    assert "layer2.0.downsample.0.weight" in r18.state_dict() and "layer1.0.downsample.0.weight" not in r18.state_dict()
    se = models.resnet50("se", fused=True)
    assert isinstance(se.layer3[5].se, attnkern.SE) and se.layer3[5].cbam is None
    assert isinstance(models.resnet50("cbam", fused=True, backend="torch").layer2[0].cbam, attnkern.CBAM)
    with pytest.raises(ValueError):
        models.resnet18("sk")


def test_authors_init():
    model = models.resnet50("cbam", fused=False)
    block = model.layer2[1]
    assert torch.all(block.cbam.spatial.bn.weight == 0)  # spatial gate starts at a constant 0.5
    assert torch.all(block.bn3.weight == 1) and torch.all(block.bn3.bias == 0)
    assert torch.all(block.cbam.channel.fc1.bias == 0) and torch.all(model.fc.bias == 0)
    std = block.conv2.weight.std().item()  # kaiming fan_out: sqrt(2 / (out * 9))
    assert abs(std / (2 / (block.conv2.out_channels * 9)) ** 0.5 - 1) < 0.05
    bam = models.resnet50("bam", fused=False)
    assert torch.all(bam.bam1.spatial.reduce.bias == 0) and torch.all(bam.bam1.channel.bn.weight == 1)


def authors_style(model):
    """`model` (a reference-module ResNet) with each attention module replaced by the authors'
    stand-in: its state dict then has the authors' key layout."""
    out = copy.deepcopy(model)
    for module in list(out.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, reference.CBAM):
                setattr(module, child_name, CBAM(child.channels))
            elif isinstance(child, reference.BAM):
                setattr(module, child_name, BAM(child.channels))
    return randomize(out)


@pytest.mark.parametrize("attention", ["cbam", "bam"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_load_authors_checkpoint(attention, prefix, tmp_path):
    theirs = authors_style(models.resnet18(attention, fused=False, num_classes=10)).double().eval()
    state = {prefix + k: v for k, v in theirs.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert any(".ChannelGate.mlp.1." in k or ".channel_att.gate_c." in k for k in state)
    ours = models.resnet18(attention, fused=True, num_classes=10).double().eval()
    result = models.load_authors_checkpoint(ours, state)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
    # A training checkpoint saved to disk, as their train_imagenet.py writes it.
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet", "state_dict": state, "best_prec1": 77.3}, path)
    again = models.resnet18(attention, fused=True, num_classes=10).double().eval()
    models.load_authors_checkpoint(again, str(path))
    with torch.no_grad():
        torch.testing.assert_close(again(x), theirs(x), **TOL)


def test_strip_module_prefix_keeps_metadata():
    wrapped = nn.DataParallel(models.resnet18(None, fused=False, num_classes=3))
    state = wrapped.state_dict()
    stripped = models.strip_module_prefix(state)
    assert list(stripped) == [k[len("module."):] for k in state]
    assert "" in stripped._metadata and "layer1.0.bn1" in stripped._metadata
    models.resnet18(None, fused=False, num_classes=3).load_state_dict(stripped)


# --- convert_model ------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["cbam", "se", "bam"])
@pytest.mark.parametrize("device", DEVICES)
def test_convert_resnet(attention, device):
    model = randomize(models.resnet18(attention, fused=False, num_classes=10)).double().to(device).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, device=device)
    with torch.no_grad():
        before = model(x)
    converted = convert_model(model, backend="auto")
    assert converted is model
    assert not unfused_left(model)
    fused = [m for m in model.modules() if isinstance(m, FUSED_TYPES)]
    assert len(fused) == (3 if attention == "bam" else 8)
    for m in fused:
        assert not m.training
        assert all(p.dtype == torch.float64 and p.device.type == torch.device(device).type for p in m.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, **TOL)


def test_convert_keeps_train_mode_and_requires_grad():
    model = models.resnet18("cbam", fused=False, num_classes=10).train()
    model.layer1[0].cbam.requires_grad_(False)
    convert_model(model, backend="torch")
    assert model.layer1[0].cbam.training and model.layer4[1].cbam.training
    assert model.layer4[1].cbam.backend == "torch"
    assert not any(p.requires_grad for p in model.layer1[0].cbam.parameters())
    assert all(p.requires_grad for p in model.layer1[1].cbam.parameters())
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()


def third_party_model():
    return nn.Sequential(
        CBAM(64),                                   # the authors'
        CBAM(64, pool_types=("avg",), no_spatial=True),
        CbamModule(64),                             # timm
        CbamModule(64, mlp_bias=True),
        SEModule(64, 8),                            # timm
        SqueezeExcitation(64, 16),                  # torchvision
        nn.Sequential(reference.CBAM(64, 8), reference.SE(64), reference.ChannelGate(64, 4, pool_types=("max",)),
                      reference.SpatialGate(5, norm=False)),
    )


def test_convert_third_party_modules():
    model = randomize(third_party_model()).double().eval()
    x = torch.randn(2, 64, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    convert_model(model)
    assert isinstance(model[0], attnkern.CBAM) and model[0].channel.pool_types == ("avg", "max")
    assert isinstance(model[1], attnkern.CBAM) and model[1].spatial is None
    assert isinstance(model[2], attnkern.CBAM) and model[2].channel.fc1.bias is None
    assert model[2].spatial.bn.momentum == 0.1 and model[0].spatial.bn.momentum == 0.01
    assert isinstance(model[4], attnkern.SE) and model[4].fc1.bias is not None
    assert isinstance(model[5], attnkern.SE)
    assert isinstance(model[6][2], attnkern.ChannelGate) and isinstance(model[6][3], attnkern.SpatialGate)
    assert not unfused_left(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, **TOL)


def test_convert_authors_bam():
    model = randomize(nn.Sequential(BAM(64), nn.ReLU())).double().eval()
    x = torch.randn(2, 64, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    convert_model(model)
    assert isinstance(model[0], attnkern.BAM) and model[0].combine == "product"
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, **TOL)


def test_convert_training_forward_matches():
    """Train mode (BatchNorm on batch statistics), gradients included, and running stats updated alike."""
    ref = randomize(nn.Sequential(CBAM(32), CbamModule(32))).double().train()
    fused = convert_model(copy.deepcopy(ref))
    x = torch.randn(3, 32, 6, 6, dtype=torch.float64, requires_grad=True)
    xf = x.detach().clone().requires_grad_()
    ref(x).square().sum().backward()
    fused(xf).square().sum().backward()
    torch.testing.assert_close(xf.grad, x.grad, **TOL)
    torch.testing.assert_close(fused[1].spatial.bn.running_mean, ref[1].spatial.conv.bn.running_mean, **TOL)


def test_convert_leaves_unsupported_variants():
    model = nn.Sequential(SEModule(64, 8, act=nn.SiLU), CbamModule(64, rd=11), nn.Conv2d(64, 64, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert_model(model)
    assert isinstance(model[0], SEModule) and isinstance(model[1], CbamModule)
    messages = " ".join(str(w.message) for w in caught)
    assert "activation" in messages and "reduction" in messages
    assert isinstance(model[2], nn.Conv2d)


def test_convert_module_itself_and_idempotent():
    module = reference.CBAM(32)
    converted = convert_model(module)
    assert isinstance(converted, attnkern.CBAM)
    assert convert_model(converted) is converted
