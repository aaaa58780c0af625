"""The DC-AE under ``--kernels triton`` against its plain torch ops, in Triton's interpreter on the CPU.

Tolerance: float32 within ``atol=1e-5`` of the plain ops for each fused op, relative to the largest output where it
exceeds one (the same sums in another order); bf16 within ``2e-2`` of the largest output (a bf16 rounding or two:
the plain convolution rounds its 2C channels before the gate, and Triton's interpreter rounds float32 to bf16
differently from torch, which the norm's four rounding points compound). A whole float32 encode and decode stays
within ``1e-4`` of the plain one's largest value (the small differences of each op, carried through every later
layer).
On a GPU, ``scripts/gpu_bench.sh`` runs these same tests without the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from compactedit_cli.engine.pipeline import EditPipeline
from compactedit_cli.models import dcae
from compactedit_cli.models.norm import RMSNorm
from compactedit_cli.random_weights.tiny import TinySpec, vae_config
from compactedit_cli.speed.kernels import kernels_unavailable
from compactedit_cli.speed.plan import SpeedPlan

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[kernels]')")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if kernels_unavailable(DEVICE) is not None:
    pytest.skip(f"Triton kernels cannot run here: {kernels_unavailable(DEVICE)}", allow_module_level=True)

from compactedit_cli.speed.kernels.depthwise_glu import depthwise_glu as fused_depthwise_glu  # noqa: E402
from compactedit_cli.speed.kernels.linear_attention import multiscale_linear_attention  # noqa: E402
from compactedit_cli.speed.kernels.norm_residual import rms_norm_residual  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
FP32 = pytest.param(torch.float32, id="fp32")
BF16_PRODUCTS = pytest.param(
    torch.bfloat16,
    id="bf16",
    marks=pytest.mark.skipif(
        DEVICE.type == "cpu",
        reason="Triton's interpreter gets bf16 products wrong (numpy has no bf16): checked on CUDA only",
    ),
)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within the tolerance of ``actual``'s dtype, relative to the largest expected value where it exceeds one."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOLERANCE[actual.dtype] * scale, rtol=0)


def _channels_last(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# (batch, heads, head size, height, width): a head size below tl.dot's 16 (padded) with odd sides, and more than
# one 64-token tile per head so the key-value state is summed from several programs.
@pytest.mark.parametrize("shape", [(2, 3, 8, 5, 7), (1, 2, 32, 13, 11)], ids=["padded-head", "split-state"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "contiguous"])
@pytest.mark.parametrize("dtype", [FP32, BF16_PRODUCTS])
def test_fused_multiscale_attention_matches_the_plain_ops(shape, channels_last, dtype):
    batch, heads, dim, height, width = shape
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, heads * 3 * dim, height, width, generator=generator).to(DEVICE, dtype)
    qkv = _channels_last(qkv, channels_last)
    expected = dcae.linear_attention(qkv, dim).float()
    actual = multiscale_linear_attention(qkv, dim)
    assert actual.shape == (batch, height, width, heads * dim) and actual.dtype == dtype and actual.is_contiguous()
    _assert_close(actual, expected)


@pytest.mark.parametrize("shape", [(1, 5, 7, 3), (2, 6, 9, 5)], ids=["odd", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_glumbconv_with_the_fused_depthwise_matches_the_plain_ops(shape, dtype):
    batch, height, width, channels = shape  # GLUMBConv widens 4x: 8C channels go through the gated depthwise
    torch.manual_seed(2)
    block = dcae.GLUMBConv(channels).to(DEVICE, dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(0, 0.5)
        x = _channels_last(torch.randn(batch, channels, height, width, device=DEVICE).to(dtype), True)
        expected = block(x).float()
        dcae.use_depthwise_glu(block, fused_depthwise_glu)
        actual = block(x)
    assert actual.dtype == dtype and actual.shape == x.shape
    _assert_close(actual, expected)


@pytest.mark.parametrize("channels", [24, 70], ids=["pow2-tail", "odd-channels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_norm_residual_matches_the_plain_ops(channels, dtype):
    generator = torch.Generator().manual_seed(3)
    norm = RMSNorm(channels, dcae.NORM_EPS, elementwise_affine=True, bias=True)
    with torch.no_grad():
        norm.weight.normal_(generator=generator)
        norm.bias.normal_(generator=generator)
    norm = norm.to(DEVICE, dtype)
    y, x = (_channels_last(torch.randn(2, channels, 5, 7, generator=generator).to(DEVICE, dtype), True) for _ in "yx")
    expected = dcae.norm_residual(norm, 3 * y, x)
    actual = rms_norm_residual(norm, 3 * y, x)
    assert actual.dtype == dtype and actual.is_contiguous(memory_format=torch.channels_last)
    _assert_close(actual, expected)


def test_the_fused_norm_residual_leaves_other_norms_and_layouts_to_the_plain_ops():
    generator = torch.Generator().manual_seed(4)
    y, x = (torch.randn(1, 8, 3, 5, generator=generator).to(DEVICE) for _ in "yx")  # contiguous, not channels-last
    batch_norm = torch.nn.BatchNorm2d(8, eps=dcae.NORM_EPS).to(DEVICE).eval()
    rms_norm = RMSNorm(8, dcae.NORM_EPS, elementwise_affine=True, bias=True).to(DEVICE)
    for norm, a, b in ((batch_norm, _channels_last(y, True), _channels_last(x, True)), (rms_norm, y, x)):
        assert torch.equal(rms_norm_residual(norm, a, b), dcae.norm_residual(norm, a, b))


def _vae() -> dcae.DCAE:
    """A tiny DC-AE with two attention scales per EfficientViT stage and several heads (head size 4)."""
    config = vae_config(TinySpec())
    scales = [[]] * 3 + [[3, 5]] * 3
    config.update(encoder_qkv_multiscales=scales, decoder_qkv_multiscales=scales)
    torch.manual_seed(5)
    vae = dcae.DCAE(dcae.DCAEConfig.from_dict(config)).eval()
    return vae.to(DEVICE, memory_format=torch.channels_last)


def _kernel_calls(vae: dcae.DCAE) -> list[tuple[str, bool]]:
    """Wraps the fused cores to record each call's op and whether its channels-last input was a view (no copy)."""
    calls: list[tuple[str, bool]] = []

    def attention(qkv: torch.Tensor, head_dim: int) -> torch.Tensor:
        calls.append(("attention", qkv.permute(0, 2, 3, 1).is_contiguous()))
        return multiscale_linear_attention(qkv, head_dim)

    def gated(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append(("depthwise", hidden.is_contiguous()))
        return fused_depthwise_glu(hidden, weight, bias)

    def norm_residual(norm: torch.nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        layout = torch.channels_last
        calls.append(("norm", y.is_contiguous(memory_format=layout) and x.is_contiguous(memory_format=layout)))
        return rms_norm_residual(norm, y, x)

    dcae.use_linear_attention(vae, attention)
    dcae.use_depthwise_glu(vae, gated)
    dcae.use_norm_residual(vae, norm_residual)
    return calls


def test_a_whole_encode_and_decode_with_the_kernels_matches_the_plain_ops():
    vae = _vae()
    pixels = torch.rand(1, 3, 64, 96, device=DEVICE) * 2 - 1  # the deepest stage is 2x3: the linear form everywhere
    with torch.no_grad():
        plain_latents = vae.encode(pixels)
        plain_pixels = vae.decode(plain_latents)
        calls = _kernel_calls(vae)
        latents = vae.encode(pixels)
        decoded = vae.decode(plain_latents)
    # every EfficientViT block (3 per side) ran both fused ops, each on a channels-last view, not a copy; every
    # ResBlock (3 per side), attention and GLUMBConv ended with the fused norm on channels-last maps
    assert sorted(calls) == sorted([("attention", True), ("depthwise", True)] * 6 + [("norm", True)] * 18)
    for actual, expected in ((latents, plain_latents), (decoded, plain_pixels)):
        torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


def test_the_speed_plan_installs_the_vae_kernels_and_tiling_keeps_working(tiny_checkpoint):
    pipe = EditPipeline.from_pretrained(tiny_checkpoint, device=DEVICE, dtype=torch.float32)
    speed: SpeedPlan = pipe.speed
    attentions = [m for m in pipe.vae.modules() if isinstance(m, dcae.MultiscaleLinearAttention)]
    convs = [m for m in pipe.vae.modules() if isinstance(m, dcae.GLUMBConv)]
    assert attentions and convs
    pixels = torch.rand(1, 3, 32, 96, device=DEVICE) * 2 - 1
    speed.set_vae_tiling(True, tile=64, stride=32)  # three overlapping tiles, whose deepest stage is quadratic

    def tiled() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            latents = speed.vae_encode(pixels)
            assert speed.vae_tiled
            return latents, speed.vae_decode(latents)

    plain = tiled()
    assert speed.set_kernels("triton").endswith("run as fused Triton kernels"), speed.notes
    assert all(m.core is multiscale_linear_attention for m in attentions)
    assert all(m.gated_depthwise is fused_depthwise_glu for m in convs)
    assert all(m.norm_residual is rms_norm_residual for m in pipe.vae.modules() if hasattr(m, "norm_residual"))
    fused = tiled()
    for actual, expected in zip(fused, plain, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
    speed.set_kernels("off")
    assert all(m.core is dcae.linear_attention for m in attentions)
    assert all(m.norm_residual is dcae.norm_residual for m in convs)
    assert all(torch.equal(a, b) for a, b in zip(tiled(), plain, strict=True))  # off is the plain path, bit for bit
