"""Fused CBAM / SE / ChannelGate / SpatialGate against attnkern.reference, on every backend that can
run here: outputs and every gradient in float64 and lower precision, both memory formats, train and
eval, gradcheck, opcheck, torch.compile, ties and NaN, and bad input."""
import copy

import pytest
import torch

import attnkern
from attnkern import reference
from attnkern.backends import has_whole_op
from conftest import TOLERANCES, backend_device_pairs, interpreted_triton, kernel_dtypes
from test_reference import check_rejects_bad_input

PAIRS = backend_device_pairs()
FORMATS = [torch.contiguous_format, torch.channels_last]

# (module name, constructor args, kwargs, input shape)
CONFIGS = [
    ("CBAM", (16, 4), {}, (2, 16, 7, 7)),
    ("CBAM", (6, 2), {"pool_types": ("max",), "mlp_bias": False}, (1, 6, 13, 17)),
    ("CBAM", (5, 5), {"spatial_norm": False, "kernel_size": 3}, (3, 5, 1, 1)),
    ("CBAM", (1, 1), {"pool_types": ("avg",)}, (2, 1, 4, 6)),
    ("CBAM", (33, 8), {"spatial": False}, (2, 33, 5, 3)),
    ("SE", (12, 4), {}, (2, 12, 5, 7)),
    ("ChannelGate", (10, 3), {"bias": False}, (1, 10, 6, 6)),
    ("SpatialGate", (5,), {}, (2, 3, 9, 4)),
]
LARGE_CONFIGS = [
    ("CBAM", (512, 16), {}, (2, 512, 7, 7)),
    ("CBAM", (64, 16), {}, (2, 64, 28, 28)),
    ("CBAM", (130, 16), {}, (1, 130, 13, 17)),
    # One sample cut into several chunks per pass on the CPU (HW over a 4096-pixel tile, and over
    # two threads' share): the backward's per-chunk partial sums.
    ("CBAM", (32, 8), {}, (1, 32, 72, 72)),
]


def configs(backend, device):
    return CONFIGS if interpreted_triton(backend, device) else CONFIGS + LARGE_CONFIGS


def config_id(config):
    name, args, kwargs, shape = config
    return f"{name}{args}{''.join(f'-{k}={v}' for k, v in kwargs.items())}-{'x'.join(map(str, shape))}"


def make_modules(name, args, kwargs, backend, device):
    """(reference in float64, fused with the same random weights); BN statistics randomised too."""
    ref = getattr(reference, name)(*args, **kwargs).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.5)
        for buf_name, b in ref.named_buffers():
            if "running_var" in buf_name:
                b.uniform_(0.5, 2.0)
            elif "running_mean" in buf_name:
                b.normal_(0, 0.3)
    fused = getattr(attnkern, name)(*args, **kwargs, backend=backend).double()
    fused.load_state_dict(ref.state_dict())
    return ref, fused.to(device)


def params(module):
    return [p for p in module.parameters()]


def run(module, x, grad_out):
    x = x.detach().requires_grad_(True)
    y = module(x)
    grads = torch.autograd.grad(y, [x] + params(module), grad_out.to(y.dtype))
    return y, grads


def assert_matches(ref, fused, x64, dtype, fmt, device, train):
    """Fused (params float32 for low precision, x in dtype) vs the float64 reference."""
    ref.train(train)
    fused.train(train)
    if dtype != torch.float64:
        fused.float()
    x = x64.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    grad_out = torch.randn_like(x64)
    y_ref, grads_ref = run(ref, x.double().cpu(), grad_out)
    y, grads = run(fused, x, grad_out.to(device))
    tol = TOLERANCES[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double().cpu(), y_ref, **tol)
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        scale = g_ref.abs().max().item() if g_ref.numel() else 1.0
        torch.testing.assert_close(
            g.double().cpu(), g_ref, rtol=tol["rtol"] * 4, atol=tol["atol"] * 4 * max(scale, 1.0),
            msg=lambda m, name=name: f"grad of {name}: {m}",
        )
    for (name, b), b_ref in zip(fused.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b.double().cpu(), b_ref.double(), **tol, msg=lambda m, name=name: f"buffer {name}: {m}")


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_reference_float64(backend, device, train):
    for config in configs(backend, device):
        name, args, kwargs, shape = config
        for fmt in FORMATS:
            ref, fused = make_modules(name, args, kwargs, backend, device)
            try:
                assert_matches(ref, fused, torch.randn(shape, dtype=torch.float64), torch.float64, fmt, device, train)
            except AssertionError as e:
                raise AssertionError(f"{config_id(config)} {fmt}: {e}") from None


@pytest.mark.parametrize("backend,device", PAIRS)
def test_matches_reference_low_precision(backend, device):
    for dtype in kernel_dtypes(backend, device):
        if dtype == torch.float64:
            continue
        for config in configs(backend, device)[:3]:
            name, args, kwargs, shape = config
            for fmt in FORMATS:
                ref, fused = make_modules(name, args, kwargs, backend, device)
                try:
                    assert_matches(ref, fused, torch.randn(shape, dtype=torch.float64), dtype, fmt, device, True)
                except AssertionError as e:
                    raise AssertionError(f"{config_id(config)} {dtype} {fmt}: {e}") from None


def check_empty_batch(name, args, backend, device):
    """An empty batch goes through forward and backward, and the BN buffers move as nn.BatchNorm's
    do (the batch is counted; the statistics stay)."""
    ref, fused = make_modules(name, args, {}, backend, device)
    x = torch.randn(0, args[0], 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    y = fused(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert ref(x.detach().cpu()).shape == x.shape
    for (buffer_name, b), b_ref in zip(fused.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b.cpu(), b_ref, msg=lambda m, n=buffer_name: f"{n}: {m}")


@pytest.mark.parametrize("backend,device", PAIRS)
def test_empty_batch(backend, device):
    check_empty_batch("CBAM", (8, 2), backend, device)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_training_steps_keep_running_stats_equal(backend, device):
    ref, fused = make_modules("CBAM", (8, 2), {}, backend, device)
    for bn in (ref.spatial.bn, fused.spatial.bn):
        bn.momentum = None  # cumulative average: the other branch of nn.BatchNorm's update
    for _ in range(3):
        x = torch.randn(3, 8, 5, 4, dtype=torch.float64)
        ref(x)
        fused(x.to(device))
    for (name, b), b_ref in zip(fused.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b.cpu(), b_ref, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend,device", PAIRS)
def test_single_value_batchnorm_raises_like_batchnorm(backend, device):
    _, fused = make_modules("CBAM", (8, 2), {}, backend, device)
    with pytest.raises(ValueError, match="more than 1 value"):
        fused(torch.randn(1, 8, 1, 1, dtype=torch.float64, device=device))
    fused.eval()
    assert fused(torch.randn(1, 8, 1, 1, dtype=torch.float64, device=device)).shape == (1, 8, 1, 1)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_max_ties_and_nan(backend, device):
    """Ties: the gradient goes to the first maximal element, as torch.max(dim) (the reference) does.
    NaN propagates to the output like torch.max."""
    ref, fused = make_modules("CBAM", (4, 2), {}, backend, device)
    ref.eval()
    fused.eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    x[:, :, 1, 1] = 3.0
    x[:, :, 3, 2] = 3.0  # a tie in every channel's spatial max
    x[:, 1] = x[:, 0]  # and between channels 0 and 1 everywhere
    assert_matches(ref, fused, x, torch.float64, torch.contiguous_format, device, False)
    x_nan = x.clone()
    x_nan[0, 2, 4, 4] = float("nan")
    y = fused(x_nan.to(device))
    with torch.no_grad():
        expected = ref(x_nan)
    torch.testing.assert_close(y.cpu(), expected, equal_nan=True, **TOLERANCES[torch.float64])
    assert torch.isnan(y[0]).any() and not torch.isnan(y[1]).any()


DIFFERENTIABLE = (0, 1, 2, 3, 4, 7, 9, 10)  # x, fc1, fc2, conv weight, bn weight and bias in small_op_args


def small_op_args(device, dtype=torch.float64, training=False, spatial=True, channel=True):
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    c, hidden = 6, 3
    x = r(2, c, 5, 4)
    ch = (r(hidden, c), r(hidden), r(c, hidden), r(c)) if channel else (None,) * 4
    sp = (r(1, 2, 3, 3), None, r(1), r(1), r(1), torch.rand(1, generator=g, dtype=dtype).to(device) + 0.5) if spatial else (None,) * 6
    return (x, *ch, True, True, *sp, 1e-5, training)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("training", [False, True])
def test_gradcheck(backend, device, training):
    args = list(small_op_args(device, training=training))
    diff = DIFFERENTIABLE
    for i in diff:
        args[i] = args[i].requires_grad_(True)

    def f(*inputs):
        full = list(args)
        for i, t in zip(diff, inputs):
            full[i] = t
        return torch.ops.attnkern.cbam(*full, backend)[0]

    # The Triton interpreter costs ~0.1 s a launch: check a random projection of the Jacobian there.
    fast = interpreted_triton(backend, device)
    assert torch.autograd.gradcheck(f, [args[i] for i in diff], eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("variant", ["full", "channel_only", "spatial_only"])
def test_opcheck(backend, device, variant):
    args = list(small_op_args(device, training=variant == "full", spatial=variant != "channel_only", channel=variant != "spatial_only"))
    for i in DIFFERENTIABLE:
        if args[i] is not None:
            args[i] = args[i].requires_grad_(True)
    torch.library.opcheck(torch.ops.attnkern.cbam.default, (*args, backend))
    x, fc1w, fc1b, fc2w, fc2b, use_avg, use_max, *spatial, eps, training = (
        t.detach() if isinstance(t, torch.Tensor) else t for t in args
    )
    with torch.no_grad():
        saved = torch.ops.attnkern.cbam(*args, backend)[1:8]
    torch.library.opcheck(
        torch.ops.attnkern.cbam_backward.default,
        (torch.randn_like(x), x, fc1w, fc1b, fc2w, fc2b, *spatial, eps, training, *saved, use_avg, use_max, backend),
    )


@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p.values[0] in ("cpu", "cuda")])
def test_opcheck_compiled_kernels(backend, device):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64).to(device)
    grad = torch.randn_like(x)
    gate = torch.rand(2, 5, generator=g, dtype=torch.float64).to(device)
    smap = torch.rand(2, 3, 4, generator=g, dtype=torch.float64).to(device)
    gp = torch.randn(2, 2, 3, 4, generator=g, dtype=torch.float64).to(device)
    sarg = torch.randint(0, 5, (2, 3, 4), generator=g).to(device)
    carg = torch.randint(0, 12, (2, 5), generator=g).to(device)
    ops = torch.ops.attnkern
    weight = torch.randn(1, 2, 7, 7, generator=g, dtype=torch.float64).to(device)
    torch.library.opcheck(ops.spatial_conv.default, (gp, weight, weight[0, 0, 0, :1]))
    torch.library.opcheck(ops.spatial_conv_backward.default, (gp[:, :1], gp, weight))
    torch.library.opcheck(ops.spatial_conv_backward.default, (gp[:, :1], gp.transpose(2, 3).contiguous().transpose(2, 3), weight))
    for xx, gg in ((x, grad), (x.to(memory_format=torch.channels_last), grad.to(memory_format=torch.channels_last))):
        torch.library.opcheck(ops.channel_pool.default, (xx,))
        torch.library.opcheck(ops.spatial_pool.default, (xx, gate))
        torch.library.opcheck(ops.apply_gates.default, (xx, gate, smap))
        torch.library.opcheck(ops.spatial_gate_grad.default, (gg, xx, gate))
        torch.library.opcheck(ops.channel_gate_grad.default, (gg, xx, smap, gp, sarg))
        torch.library.opcheck(ops.cbam_input_grad.default, (gg, xx, gate, smap, gp, sarg, gate, gate, carg))
        for product in (False, True):
            torch.library.opcheck(ops.bam_combine.default, (xx, gate, smap, product))
            torch.library.opcheck(ops.bam_combine_backward.default, (gg, xx, gate, smap, product))
            torch.library.opcheck(ops.bam_input_grad.default, (gg, xx, gate, smap, product, gate, gg))


WHOLE_OP_PAIRS = [p for p in PAIRS if has_whole_op(p.values[0])]


@pytest.mark.parametrize("backend,device", WHOLE_OP_PAIRS)
def test_whole_op_rejects_bad_parameters(backend, device):
    """The whole-op kernel is public: non-floating parameters and a BN bias without its weight are
    errors, not silently used or dropped."""
    args = list(small_op_args(device))
    bad = list(args)
    bad[1] = args[1].to(torch.int64)
    with pytest.raises(RuntimeError, match="fc1_weight must have a floating dtype"):
        torch.ops.attnkern.cbam_fused_forward(*bad, False)
    bad = list(args)
    bad[9] = None  # bn_weight
    with pytest.raises(RuntimeError, match="bn_weight and bn_bias come together"):
        torch.ops.attnkern.cbam_fused_forward(*bad, False)


@pytest.mark.parametrize("backend,device", WHOLE_OP_PAIRS)
@pytest.mark.parametrize("variant", ["train", "eval", "channel_only", "spatial_only"])
def test_opcheck_whole_op_kernels(backend, device, variant):
    """The whole-op kernels, their fakes and the forward's C++ autograd (csrc/cbam_fused_autograd.cpp)."""
    args = list(small_op_args(device, training=variant == "train", spatial=variant != "channel_only", channel=variant != "spatial_only"))
    ops = torch.ops.attnkern
    saved = ops.cbam_fused_forward(*args, True)[1:8]
    x, fc1w, fc1b, fc2w, fc2b, use_avg, use_max, *spatial, eps, training = args
    grad = torch.randn_like(x)
    torch.library.opcheck(
        ops.cbam_fused_backward.default, (grad, x, fc1w, fc1b, fc2w, fc2b, *spatial, eps, training, *saved, use_avg, use_max)
    )
    for need_argmax in (False, True):
        torch.library.opcheck(ops.cbam_fused_forward.default, (*args, need_argmax))
    for i in DIFFERENTIABLE:
        if args[i] is not None:
            args[i].requires_grad_(True)
    for need_argmax in (False, True):
        torch.library.opcheck(ops.cbam_fused_forward.default, (*args, need_argmax))


@pytest.mark.parametrize("backend,device", WHOLE_OP_PAIRS)
@pytest.mark.parametrize("training", [False, True])
def test_gradcheck_whole_op_autograd(backend, device, training):
    args = list(small_op_args(device, training=training))
    for i in DIFFERENTIABLE:
        args[i].requires_grad_(True)

    def f(*inputs):
        full = list(args)
        for i, t in zip(DIFFERENTIABLE, inputs):
            full[i] = t
        # need_argmax=False, as the modules call it: the autograd kernel must turn it on.
        return torch.ops.attnkern.cbam_fused_forward(*full, False)[0]

    assert torch.autograd.gradcheck(f, [args[i] for i in DIFFERENTIABLE], eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend,device", WHOLE_OP_PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 6, 5, 4), (3, 40, 13, 17), (1, 300, 3, 3)])
def test_whole_op_forward_without_argmax(backend, device, dtype, channels_last, shape):
    """need_argmax=False (inference) takes other paths (pools without argmax bookkeeping; a sample
    per thread for the channel gate and the spatial pool where that applies): the same outputs to
    rounding, argmaxes empty, NaN still maximal in both max pools. With inputs that require grad,
    the argmaxes are back."""
    args = list(small_op_args(device, dtype=torch.float64))
    n, c, h, w = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    x[0, c // 2, h // 2, w - 1] = float("nan")
    x[-1, : c // 2, 0, 0] = 3.0  # ties in the spatial max
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    hidden = max(1, c // 4)
    args[0] = x
    args[1:5] = [torch.randn(hidden, c, generator=g), torch.randn(hidden, generator=g),
                 torch.randn(c, hidden, generator=g), torch.randn(c, generator=g)]
    args[1:5] = [t.to(device=device, dtype=dtype) for t in args[1:5]]
    args[7:13] = [None if t is None else t.to(device=device, dtype=dtype) for t in args[7:13]]
    ops = torch.ops.attnkern
    with torch.no_grad():
        full = ops.cbam_fused_forward(*args, True)
        lean = ops.cbam_fused_forward(*args, False)
    for i, (a, b) in enumerate(zip(full, lean)):
        if i in (2, 5):  # channel_argmax, spatial_argmax
            assert a.numel() > 0 and b.numel() == 0
        else:
            torch.testing.assert_close(b, a, equal_nan=True, **TOLERANCES[dtype])
    assert torch.isnan(lean[1][1, 0, c // 2]) and torch.isnan(lean[4][0, 1, h // 2, w - 1])
    x.requires_grad_(True)
    assert ops.cbam_fused_forward(*args, False)[5].shape == (n, h, w)


@pytest.mark.parametrize("backend,device", WHOLE_OP_PAIRS)
@pytest.mark.parametrize(
    "name,args,kwargs", [("SE", (40, 4), {}), ("ChannelGate", (40, 4), {}), ("ChannelGate", (300, 16), {}),
                         ("CBAM", (40, 4), {}), ("CBAM", (300, 16), {}),
                         ("CBAM", (40, 4), {"spatial_norm": False, "kernel_size": 3})]
)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_inference_per_sample(backend, device, name, args, kwargs, fmt, dtype):
    """Inference, where the CPU kernel runs the whole gate a sample per thread (N >= threads and a
    small MLP; N = 1 with two threads takes the batched path): the channel gate and the scaling, or
    for CBAM the spatial pool, conv, BN with running statistics, sigmoid and scaling. Against the
    reference, with a NaN that must turn its own sample's output to NaN and leave the others alone."""
    ref, fused = make_modules(name, args, kwargs, backend, device)
    ref, fused = ref.eval().to(device), fused.eval().to(dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
    for n in (max(2, torch.get_num_threads()), 1):
        x = torch.randn(n, args[0], 17, 19, dtype=torch.float64).to(device=device, dtype=dtype, memory_format=fmt)
        x[0, 3, 4, 5] = float("nan")
        with torch.no_grad():
            y, expected = fused(x), ref(x.double()).to(dtype)  # the float64 reference on the same input
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y, expected, equal_nan=True, **TOLERANCES[dtype])
        assert torch.isnan(y[0]).all() and not torch.isnan(y[1:]).any()
    # Training takes the per-sample forward too where no BN needs the batch's statistics.
    if name == "SE" or kwargs.get("spatial_norm") is False:
        assert_matches(ref, fused, torch.randn(2, args[0], 17, 19, dtype=torch.float64), dtype, fmt, device, True)


@pytest.mark.parametrize("backend,device", WHOLE_OP_PAIRS)
@pytest.mark.parametrize("kwargs", [{}, {"spatial_norm": False, "kernel_size": 3}])
@pytest.mark.parametrize("shape", [(2, 16, 1, 17), (3, 16, 13, 1), (2, 24, 9, 40), (2, 16, 3, 3), (3, 16, 1, 1)])
def test_per_sample_odd_maps(backend, device, kwargs, shape):
    """Maps one pixel high or wide, an odd height, a width over one conv register block and maps of
    fewer pixels than a vector, with a small MLP (reduction 16: hidden width 1), so the CPU takes the
    per-sample forward: eval, and training (per-sample conv; without BN the whole gate) against the
    float64 reference."""
    ref, fused = make_modules("CBAM", (shape[1], 16), kwargs, backend, device)
    x = torch.randn(shape, dtype=torch.float64)
    for fmt in FORMATS:
        for train in (False, True):
            assert_matches(ref, fused, x, torch.float32, fmt, device, train)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_double_backward_is_refused(backend, device):
    """No backend differentiates its backward: create_graph must fail loudly, not drop terms."""
    fused = attnkern.CBAM(8, 2, backend=backend).to(device)
    x = torch.randn(2, 8, 5, 5, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward .* use the reference modules in attnkern.reference"):
        (grad,) = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
        grad.sum().backward()


def check_compiled_matches_eager(fused, shape, device):
    """torch.compile(fullgraph=True) of a fused module against eager: output, every gradient, buffers.
    In float64, so that only tracing errors show: in float32 the two runs differed by rounding
    (1.5e-5 on a BAM BN-weight gradient once the 1x1 convs became GEMMs)."""
    torch._dynamo.reset()
    fused.double()
    eager = copy.deepcopy(fused)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(shape, device=device, dtype=torch.float64)
    grad = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = eager(xa), compiled(xb)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(yb, ya)
    torch.testing.assert_close(xb.grad, xa.grad)
    for (name, pa), pb in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=lambda m, name=name: f"{name}: {m}")
    for (name, ba), bb in zip(eager.named_buffers(), fused.buffers()):
        torch.testing.assert_close(bb, ba, msg=lambda m, name=name: f"{name}: {m}")
    # Inference (eval, no_grad) traces other paths: the CPU whole-op kernel then skips the argmaxes.
    fused.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x))


@pytest.mark.parametrize("backend,device", [p for p in PAIRS if not interpreted_triton(*p.values)])
def test_torch_compile_fullgraph(backend, device):
    _, fused = make_modules("CBAM", (16, 4), {}, backend, device)
    check_compiled_matches_eager(fused, (2, 16, 6, 5), device)


def check_autocast_keeps_float32_params(fused, shape, device):
    """Under bf16 autocast: bf16 output and input gradient, float32 parameters and their gradients."""
    fused.float()
    x = torch.randn(shape, device=device).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = fused(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    for name, p in fused.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name


@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p.values[0] != "triton"])
def test_autocast_keeps_float32_params(backend, device):
    _, fused = make_modules("CBAM", (16, 4), {}, backend, device)
    check_autocast_keeps_float32_params(fused, (2, 16, 5, 5), device)


def test_state_dict_and_constructor_match_reference():
    for name, args, kwargs, _ in CONFIGS:
        ref = getattr(reference, name)(*args, **kwargs)
        fused = getattr(attnkern, name)(*args, **kwargs)
        assert list(ref.state_dict()) == list(fused.state_dict())
        assert isinstance(fused, type(ref))
        fused.load_state_dict(ref.state_dict())


def test_fused_loads_authors_layout():
    from test_reference import AuthorsCBAM

    theirs = AuthorsCBAM(32, 8).double().eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    fused = attnkern.CBAM(32, 8).double().eval()
    fused.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 32, 7, 9, dtype=torch.float64)
    torch.testing.assert_close(fused(x), theirs(x))


def test_bad_input_and_backend():
    check_rejects_bad_input(attnkern.CBAM(8, 2))
    with pytest.raises(ValueError, match="unknown backend"):
        attnkern.CBAM(8, 2, backend="metal")
    with pytest.raises(ValueError, match="no hidden unit"):
        attnkern.SE(8, 16)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cannot run cpu tensors"):
            attnkern.CBAM(8, 2, backend="cuda")(torch.randn(2, 8, 5, 5))
