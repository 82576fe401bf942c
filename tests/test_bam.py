"""Fused BAM against attnkern.reference.BAM on every backend that can run here: the output and every
gradient (x and all parameters) in float64 and lower precision, both combine forms, train and eval
(running statistics included), both memory formats, shapes from 1x1 to maps smaller than the
dilation's reach, gradcheck and opcheck on attnkern::bam / attnkern::bam_backward, torch.compile,
the authors' state-dict layout, what backward saves, and bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F

import attnkern
from attnkern import reference
from attnkern.backends import has_whole_op
from attnkern.modules.bam import bam_op_inputs
from conftest import TOLERANCES, backend_device_pairs, devices, interpreted_triton, kernel_dtypes
from test_cbam import (
    FORMATS,
    assert_matches,
    check_autocast_keeps_float32_params,
    check_compiled_matches_eager,
    check_empty_batch,
    make_modules,
)
from test_reference import AuthorsBAM, check_rejects_bad_input, randomize

PAIRS = backend_device_pairs()
COMBINES = ["product", "sum"]

# (constructor args, kwargs, input shape); combine is parametrized separately.
CONFIGS = [
    ((16, 4), {}, (2, 16, 7, 7)),
    ((12, 4), {}, (3, 12, 13, 17)),  # H != W, both odd
    ((8, 2), {}, (2, 8, 3, 2)),  # H, W smaller than the dilation's reach (4): the taps fall in the padding
    ((8, 8), {"dilation": 2, "num_dilated": 1}, (2, 8, 1, 1)),  # a 1x1 map, hidden width 1
    ((6, 3), {"num_dilated": 0}, (4, 6, 5, 1)),  # no dilated conv, W = 1
    ((10, 3), {"num_dilated": 3, "dilation": 1}, (2, 10, 4, 6)),  # C not a multiple of r
]
LARGE_CONFIGS = [
    ((64, 16), {}, (2, 64, 14, 14)),
    ((130, 16), {}, (2, 130, 9, 11)),
    ((42, 2), {}, (2, 42, 9, 11)),  # hidden width 21: past one vector, and not a multiple of one
    ((48, 3), {"dilation": 3}, (2, 48, 5, 13)),  # hidden width 16, the widest the CPU's own convs take
    ((40, 4), {}, (2, 40, 6, 9)),  # hidden width 10: channels and pixels past whole vectors in those convs
    # The CPU's channels_last reduce weight grad walks a sample in blocks of 128 KiB of x (64 pixels
    # here): two whole blocks and a partial one.
    ((256, 16), {}, (2, 256, 12, 12)),
    # Channel-gate weights past the CPU's kLinearMaxWeightBytes (512 x 128 in float64): ATen's GEMMs.
    ((512, 4), {}, (2, 512, 3, 3)),
]
# Low precision needs batches of several samples: with N = 2, BatchNorm1d's batch variance over two
# pooled vectors can be ~1e-4, and its backward then scales float32 rounding by 1 / sqrt(var) ~ 100 in
# fc1's gradient (seen at one seed in 12 with N = 2; none in 12 with these shapes).
LOW_PRECISION_CONFIGS = [
    ((16, 4), {}, (8, 16, 7, 7)),
    ((12, 4), {}, (6, 12, 13, 17)),
    ((64, 16), {}, (8, 64, 14, 14)),
    # hidden width 12 (the CPU's wide convs) on 13x11 maps: its NCHW input goes through 8 x 8 blocks
    # and the channels and pixels past them
    ((48, 4), {}, (8, 48, 13, 11)),
]


# The Triton interpreter runs every kernel launch in Python, at seconds per call on larger maps.
INTERPRETER_CONFIGS = [((8, 2), {}, (2, 8, 5, 7)), ((8, 2), {}, (2, 8, 3, 2))]
INTERPRETER_LOW_PRECISION_CONFIGS = [((8, 2), {}, (4, 8, 5, 6))]


def configs(backend, device):
    return INTERPRETER_CONFIGS if interpreted_triton(backend, device) else CONFIGS + LARGE_CONFIGS


def with_combine(kwargs, combine):
    return {**kwargs, "combine": combine}


def config_id(config, combine):
    args, kwargs, shape = config
    return f"BAM{args}{''.join(f'-{k}={v}' for k, v in kwargs.items())}-{combine}-{'x'.join(map(str, shape))}"


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("combine", COMBINES)
def test_matches_reference_float64(backend, device, train, combine):
    """Output, grads of x and every parameter, and the BN buffers after the step."""
    for config in configs(backend, device):
        args, kwargs, shape = config
        for fmt in FORMATS:
            ref, fused = make_modules("BAM", args, with_combine(kwargs, combine), backend, device)
            try:
                assert_matches(ref, fused, torch.randn(shape, dtype=torch.float64), torch.float64, fmt, device, train)
            except AssertionError as e:
                raise AssertionError(f"{config_id(config, combine)} {fmt}: {e}") from None


def low_precision_reduce_conv(ref, dtype):
    """Makes the float64 reference compute its 1x1 reduce conv as the fused op documents it does:
    over x in x's dtype (weights cast to it, float32 accumulation inside oneDNN / cuDNN, output
    rounded to that dtype, the bias added after in float64; widening x instead would cost two more
    full-size passes), its backward in that dtype too. In eval the op first folds the BN into the
    conv, so the weights rounded are W * s and the output rounded is the BN's output minus its
    shift; the hook returns the pre-BN value that the reference's BN maps to exactly that.
    Everything else stays float64.

    Why: on these small test shapes the spatial branch's gradients are ill-conditioned with respect
    to that one rounding. In the float64 reference alone, perturbing the reduce output by 2**-9
    relative noise (bf16's rounding) moves the gradients of the spatial layers' parameters by 10-50%
    of their largest element, in train and eval mode (presumably ReLU gates near zero flipping, in
    sums of a few hundred terms), so comparing the bf16 op with the exact reference would measure
    that conditioning, not the fused op."""
    bn = ref.spatial.reduce_bn

    def hook(module, inputs, out):
        x = inputs[0].to(dtype)
        bias = module.bias.view(1, -1, 1, 1)
        if bn.training:
            return F.conv2d(x, module.weight.to(dtype)).to(out.dtype) + bias
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(-1, 1, 1, 1)
        folded = F.conv2d(x, (module.weight * scale).to(dtype)).to(out.dtype)
        return folded / scale.view(1, -1, 1, 1) + bias

    ref.spatial.reduce.register_forward_hook(hook)
    return ref


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("combine", COMBINES)
def test_matches_reference_low_precision(backend, device, combine):
    """float32 / bf16 (/ fp16 on CUDA) input with float32 parameters vs the float64 reference."""
    for dtype in kernel_dtypes(backend, device):
        if dtype == torch.float64:
            continue
        interpreted = interpreted_triton(backend, device)
        for config in INTERPRETER_LOW_PRECISION_CONFIGS if interpreted else LOW_PRECISION_CONFIGS:
            args, kwargs, shape = config
            for fmt in FORMATS:
                for train in (True, False):
                    x = torch.randn(shape, dtype=torch.float64)
                    ref, fused = make_modules("BAM", args, with_combine(kwargs, combine), backend, device)
                    ref = low_precision_reduce_conv(ref, dtype)
                    try:
                        assert_matches(ref, fused, x, dtype, fmt, device, train)
                    except AssertionError as e:
                        raise AssertionError(f"{config_id(config, combine)} {dtype} {fmt} train={train}: {e}") from None


@pytest.mark.parametrize("backend,device", PAIRS)
def test_memory_formats_in_and_out(backend, device):
    """y and dx keep x's memory format; channels_last parameters (model.to(memory_format=...)) and
    a non-dense input work too."""
    for fmt in FORMATS:
        ref, fused = make_modules("BAM", (16, 4), {}, backend, device)
        fused.to(memory_format=torch.channels_last)
        assert fused.spatial.dilated[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert_matches(ref, fused, torch.randn(2, 16, 6, 5, dtype=torch.float64), torch.float64, fmt, device, True)
        x = torch.randn(2, 16, 6, 5, dtype=torch.float64, device=device).contiguous(memory_format=fmt).requires_grad_(True)
        y = fused(x)
        y.backward(torch.randn_like(y))
        assert y.is_contiguous(memory_format=fmt) and x.grad.is_contiguous(memory_format=fmt)
    ref, fused = make_modules("BAM", (16, 4), {}, backend, device)
    strided = torch.randn(2, 16, 6, 10, dtype=torch.float64, device=device)[..., ::2]
    torch.testing.assert_close(fused.eval()(strided).cpu(), ref.eval()(strided.cpu()), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend,device", PAIRS)
def test_empty_batch(backend, device):
    check_empty_batch("BAM", (16, 4), backend, device)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_batch_of_one(backend, device):
    """Training with N = 1 raises as BatchNorm1d does (one value per channel), before touching any
    buffer (nn.BatchNorm counts the batch first); eval works."""
    ref, fused = make_modules("BAM", (8, 2), {}, backend, device)
    x = torch.randn(1, 8, 5, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        copy.deepcopy(ref).train()(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused.train()(x.to(device))
    assert fused.channel.bn.num_batches_tracked.item() == 0
    assert_matches(ref, fused, x, torch.float64, torch.contiguous_format, device, False)


@pytest.mark.parametrize("backend,device", [p for p in PAIRS if not interpreted_triton(*p.values)])
def test_one_sample_split_across_threads(backend, device):
    """Eval with N = 1 on a map big enough that the CPU's pool + reduce pass cuts the sample into
    pixel chunks for its threads (partial channel sums merged)."""
    for fmt in FORMATS:
        for dtype in (torch.float64, torch.float32):
            ref, fused = make_modules("BAM", (42, 2), {}, backend, device)
            assert_matches(ref, fused, torch.randn(1, 42, 28, 29, dtype=torch.float64), dtype, fmt, device, False)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_training_steps_keep_running_stats_equal(backend, device):
    ref, fused = make_modules("BAM", (8, 2), {}, backend, device)
    for module in (ref, fused):
        module.channel.bn.momentum = None  # cumulative average: nn.BatchNorm's other update rule
        module.spatial.dilated_bn[1].momentum = 0.3
    for _ in range(3):
        x = torch.randn(3, 8, 5, 4, dtype=torch.float64)
        ref(x)
        fused(x.to(device))
    assert fused.channel.bn.num_batches_tracked.item() == 3
    for (name, b), b_ref in zip(fused.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b.cpu(), b_ref, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend,device", PAIRS)
def test_backward_saves_only_x_at_full_size(backend, device):
    """Autograd keeps x plus tensors a C/r-th of its size or less (eager keeps several full-size M)."""
    _, fused = make_modules("BAM", (32, 16), {}, backend, device)
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused(x)
    full = [t for t in saved if t.numel() >= x.numel()]
    assert len(full) == 1 and full[0] is x, [tuple(t.shape) for t in full]
    assert max(t.numel() for t in saved if t is not x) <= x.numel() // 16


def op_args(device, training, *, shape=(3, 8, 5, 4), reduction=4, num_dilated=2, dilation=2, combine="product"):
    module = randomize(reference.BAM(shape[1], reduction, dilation=dilation, num_dilated=num_dilated, combine=combine))
    module = module.double().to(device).train(training)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    return list(bam_op_inputs(module, x))


DIFFERENTIABLE = (0, 1, 2, 3, 4)  # x, weights, biases, bn weights, bn biases


def op_test_params(variants):
    """(backend, device, *variant) for every pair; the interpreted Triton pair gets the first variant
    only (each of these costs seconds there)."""
    params = []
    for p in PAIRS:
        for variant in variants[:1] if interpreted_triton(*p.values) else variants:
            params.append(pytest.param(*p.values, *variant, id=f"{p.id}-{'-'.join(map(str, variant))}"))
    return params


@pytest.mark.parametrize(
    "backend,device,training,combine",
    op_test_params([(True, "product"), (False, "sum"), (True, "sum"), (False, "product")]),
)
def test_gradcheck(backend, device, training, combine):
    args = op_args(device, training, combine=combine, shape=(3, 8, 4, 3), num_dilated=1)
    # Under the Triton interpreter, one random direction instead of the whole Jacobian.
    check_gradcheck(args, lambda full: torch.ops.attnkern.bam(*full, backend)[0], interpreted_triton(backend, device))


WHOLE_OP_PAIRS = [p for p in PAIRS if has_whole_op(p.values[0])]


@pytest.mark.parametrize("backend,device", WHOLE_OP_PAIRS)
@pytest.mark.parametrize("training,combine", [(True, "product"), (False, "sum")])
def test_gradcheck_whole_op_autograd(backend, device, training, combine):
    """The fused module's own path: bam_fused_forward and its C++ autograd (csrc/bam_fused_autograd.cpp)."""
    args = op_args(device, training, combine=combine, shape=(3, 8, 4, 3), num_dilated=1)
    check_gradcheck(args, lambda full: torch.ops.attnkern.bam_fused_forward(*full)[0], False)


def check_gradcheck(args, forward, fast):
    """float64 gradcheck of forward(args) wrt x and every parameter (lists flattened)."""
    flat, spec = [], []
    for i in DIFFERENTIABLE:
        group = args[i] if isinstance(args[i], list) else [args[i]]
        flat += [t.detach().clone().requires_grad_(True) for t in group]
        spec.append(len(group))

    def f(*inputs):
        full, rest = list(args), list(inputs)
        for i, size in zip(DIFFERENTIABLE, spec):
            full[i] = rest[:size] if isinstance(args[i], list) else rest[0]
            rest = rest[size:]
        return forward(full)

    assert torch.autograd.gradcheck(f, flat, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast)


@pytest.mark.parametrize(
    "backend,device,training,combine,fmt",
    op_test_params([(True, "product", torch.contiguous_format), (False, "sum", torch.channels_last)]),
)
def test_opcheck(backend, device, training, combine, fmt):
    ops = torch.ops.attnkern
    check_opcheck(ops.bam.default, ops.bam_backward.default, (backend,), device, training, combine, fmt)


@pytest.mark.parametrize("backend,device", WHOLE_OP_PAIRS)
@pytest.mark.parametrize(
    "training,combine,fmt", [(True, "product", torch.contiguous_format), (False, "sum", torch.channels_last)]
)
def test_opcheck_whole_op_kernels(backend, device, training, combine, fmt):
    """The whole-op kernels, their fakes and the forward's C++ autograd registration."""
    ops = torch.ops.attnkern
    check_opcheck(ops.bam_fused_forward.default, ops.bam_fused_backward.default, (), device, training, combine, fmt)


def check_opcheck(forward, backward, tail, device, training, combine, fmt):
    """opcheck of a BAM forward op (inputs requiring grad) and of its backward op on the forward's
    outputs; `tail` is what follows the shared arguments (the backend, for the Python ops)."""
    args = op_args(device, training, combine=combine)
    args[0] = args[0].contiguous(memory_format=fmt)
    for i in DIFFERENTIABLE:
        args[i] = [t.requires_grad_(True) for t in args[i]] if isinstance(args[i], list) else args[i].requires_grad_(True)
    torch.library.opcheck(forward, (*args, *tail))
    with torch.no_grad():
        _, avg, channel_att, spatial_att, hidden, batch_means, batch_vars = forward(*args, *tail)
    x, weights, biases, bn_weights, bn_biases, running_means, running_vars, eps, bn_training, dilation, product = (
        torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, args)
    )
    means = batch_means if training else running_means
    variances = batch_vars if training else running_vars
    grad = torch.randn_like(x)
    torch.library.opcheck(
        backward,
        (grad, x, weights, biases, bn_weights, bn_biases, means, variances, eps, bn_training, dilation, product,
         avg, channel_att, spatial_att, hidden, *tail),
    )


@pytest.mark.parametrize("backend,device", PAIRS)
def test_double_backward_is_refused(backend, device):
    """No backend differentiates its backward: create_graph must fail loudly, not drop terms."""
    _, fused = make_modules("BAM", (16, 4), {}, backend, device)
    x = torch.randn(2, 16, 5, 5, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward .* use the reference modules in attnkern.reference"):
        (grad,) = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
        grad.sum().backward()


@pytest.mark.parametrize("backend,device", WHOLE_OP_PAIRS)
def test_whole_op_rejects_bad_layout(backend, device):
    args = op_args(device, False)
    args[4] = args[4][:-1]  # one BN bias short
    with pytest.raises(RuntimeError, match="every BN needs"):
        torch.ops.attnkern.bam_fused_forward(*args)
    args = op_args(device, False)
    args[1] = args[1][:-1]  # one weight short
    with pytest.raises(RuntimeError, match="expected weights/biases"):
        torch.ops.attnkern.bam_fused_forward(*args)


@pytest.mark.parametrize(
    "backend,device", [("torch", d) for d in devices()] + [p.values for p in WHOLE_OP_PAIRS]
)
def test_torch_compile_fullgraph(backend, device):
    """One compile per op path (each costs seconds): attnkern::bam / attnkern::bam_backward with their
    fakes and Python autograd, the same for every backend that composes kernels (opcheck's
    aot_dispatch test covers each backend's kernels under tracing), and the whole-op kernels with
    their C++ autograd."""
    _, fused = make_modules("BAM", (16, 4), {}, backend, device)
    check_compiled_matches_eager(fused, (2, 16, 6, 5), device)


@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p.values[0] != "triton"])
def test_autocast_keeps_float32_params(backend, device):
    _, fused = make_modules("BAM", (16, 4), {}, backend, device)
    check_autocast_keeps_float32_params(fused, (2, 16, 5, 5), device)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fused_loads_authors_layout(train):
    """Against an independent re-implementation of the authors' forward (their module names);
    in training the BN buffers must move alike too."""
    theirs = randomize(AuthorsBAM(32, 8)).double().train(train)
    fused = attnkern.BAM(32, 8).double().train(train)
    fused.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 32, 7, 9, dtype=torch.float64)
    torch.testing.assert_close(fused(x), theirs(x))
    for (name, b), b_theirs in zip(fused.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(b, b_theirs, msg=lambda m, name=name: f"{name}: {m}")


def test_state_dict_and_constructor_match_reference():
    for args, kwargs, _ in CONFIGS:
        ref = reference.BAM(*args, **kwargs)
        fused = attnkern.BAM(*args, **kwargs)
        assert isinstance(fused, reference.BAM)
        assert list(ref.state_dict()) == list(fused.state_dict())
        fused.load_state_dict(ref.state_dict())


def test_bad_input_and_configuration():
    check_rejects_bad_input(attnkern.BAM(8, 2))
    with pytest.raises(ValueError, match="no hidden unit"):
        attnkern.BAM(8, 16)  # C < reduction
    with pytest.raises(ValueError, match="combine"):
        attnkern.BAM(8, 2, combine="mul")
    with pytest.raises(ValueError, match="unknown backend"):
        attnkern.BAM(8, 2, backend="metal")
