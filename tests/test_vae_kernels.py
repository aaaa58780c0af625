"""The DC-AE under ``--kernels triton`` against its plain torch ops, in Triton's interpreter on the CPU.

Tolerance: float32 within ``atol=1e-5`` of the plain ops for each fused op (the same sums in another order; outputs
here are of order one); bf16 within ``2e-2`` of the largest output (one bf16 rounding of the output, and the plain
convolution's rounding of its 2C channels before the gate). A whole float32 encode and decode stays within ``1e-4``
of the plain one's largest value (the small differences of each op, carried through every later layer).
On a GPU, ``scripts/gpu_bench.sh`` runs these same tests without the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from compactedit_cli.engine.pipeline import EditPipeline
from compactedit_cli.models import dcae
from compactedit_cli.random_weights.tiny import TinySpec, vae_config
from compactedit_cli.speed.kernels import kernels_unavailable
from compactedit_cli.speed.plan import SpeedPlan

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[kernels]')")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if kernels_unavailable(DEVICE) is not None:
    pytest.skip(f"Triton kernels cannot run here: {kernels_unavailable(DEVICE)}", allow_module_level=True)

from compactedit_cli.speed.kernels.depthwise_glu import depthwise_glu as fused_depthwise_glu  # noqa: E402
from compactedit_cli.speed.kernels.linear_attention import multiscale_linear_attention  # noqa: E402

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
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected, atol=TOLERANCE[dtype] * max(1.0, scale), rtol=0)


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
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected, atol=TOLERANCE[dtype] * scale, rtol=0)


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

    dcae.use_linear_attention(vae, attention)
    dcae.use_depthwise_glu(vae, gated)
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
    # every EfficientViT block (3 per side) ran both fused ops, each on a channels-last view, not a copy
    assert sorted(calls) == sorted([("attention", True), ("depthwise", True)] * 6)
    for actual, expected in ((latents, plain_latents), (decoded, plain_pixels)):
        torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


def test_the_speed_plan_installs_the_vae_kernels_and_tiling_keeps_working(tiny_checkpoint):
    pipe = EditPipeline.from_pretrained(tiny_checkpoint, device=DEVICE, dtype=torch.float32)
    speed: SpeedPlan = pipe.speed
    attentions = [m for m in pipe.vae.modules() if isinstance(m, dcae.MultiscaleLinearAttention)]
    convs = [m for m in pipe.vae.modules() if isinstance(m, dcae.GLUMBConv)]
    assert attentions and convs
    pixels = torch.rand(1, 3, 64, 96, device=DEVICE) * 2 - 1
    speed.set_vae_tiling(True, tile=64, stride=32)  # 64² tiles: the deepest stage is 2x2, the quadratic form runs

    def tiled() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            latents = speed.vae_encode(pixels)
            assert speed.vae_tiled
            return latents, speed.vae_decode(latents)

    plain = tiled()
    assert speed.set_kernels("triton").endswith("run as fused Triton kernels"), speed.notes
    assert all(m.core is multiscale_linear_attention for m in attentions)
    assert all(m.gated_depthwise is fused_depthwise_glu for m in convs)
    fused = tiled()
    for actual, expected in zip(fused, plain, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
    speed.set_kernels("off")
    assert all(m.core is dcae.linear_attention for m in attentions)
    assert all(torch.equal(a, b) for a, b in zip(tiled(), plain, strict=True))  # off is the plain path, bit for bit
