"""The fused Triton kernels (``--kernels triton``) against the plain torch ops, in Triton's interpreter on the CPU.

Tolerance: float32 inputs within ``atol=1e-5`` of the plain ops (same sums in another order; outputs here reach
about ±70). bf16 inputs within ``atol=2e-2`` of the plain ops (one bf16 rounding of the output). The depthwise
convolution and the modulated norm are held to those tolerances times their largest output: in bf16 the plain ops
round every intermediate (the norm, ``1 + scale``, the product) to bf16 and the kernels round once, so they differ
by a few bf16 steps of the output's size. Through a whole tiny edit the final latents stay within the fast path's
own tolerance of the plain kernels' (test_optimisations).
On a GPU, ``scripts/gpu_bench.sh`` runs these same tests without the interpreter.

Triton chooses its interpreter when it is first imported, so ``tests/conftest.py`` sets ``TRITON_INTERPRET=1``
on a machine without CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from compactedit_cli.engine.pipeline import EditPipeline
from compactedit_cli.models.attention import linear_attention
from compactedit_cli.models.feedforward import depthwise_glu
from compactedit_cli.models.transformer import gated_residual, norm_modulate
from compactedit_cli.speed.kernels import kernels_unavailable

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[kernels]')")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if kernels_unavailable(DEVICE) is not None:
    pytest.skip(f"Triton kernels cannot run here: {kernels_unavailable(DEVICE)}", allow_module_level=True)

from compactedit_cli.speed.kernels.depthwise_glu import depthwise_glu as fused_depthwise_glu  # noqa: E402
from compactedit_cli.speed.kernels.linear_attention import linear_attention as fused_linear_attention  # noqa: E402
from compactedit_cli.speed.kernels.norm_modulate import gated_residual as fused_gated_residual  # noqa: E402
from compactedit_cli.speed.kernels.norm_modulate import norm_modulate as fused_norm_modulate  # noqa: E402

PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
BF16 = pytest.param(
    torch.bfloat16,
    id="bf16",
    marks=pytest.mark.skipif(
        DEVICE.type == "cpu",
        reason="Triton's interpreter gets bf16 products wrong (numpy has no bf16): checked on CUDA only",
    ),
)


# (batch, tokens, heads, head size): a head size below tl.dot's 16 (padded), tokens not a multiple of the 64-token
# tile, and enough tiles that the key-value state is summed from several programs.
@pytest.mark.parametrize("shape", [(2, 37, 2, 8), (1, 300, 2, 32)], ids=["padded-head", "split-state"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
def test_fused_linear_attention_matches_the_plain_ops(shape, dtype):
    batch, tokens, heads, dim = shape
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, tokens, heads * dim, generator=generator).to(DEVICE, dtype) for _ in range(3))
    expected = linear_attention(q, k, v, heads)
    actual = fused_linear_attention(q, k, v, heads)
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("shape", [(2, 5, 7, 8), (1, 3, 9, 70)], ids=["small", "channel-tail"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_depthwise_glu_matches_the_plain_ops(shape, bias, dtype):
    batch, height, width, channels = shape
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, height, width, 2 * channels, generator=generator).to(DEVICE, dtype)
    weight = torch.randn(2 * channels, 1, 3, 3, generator=generator).to(DEVICE, dtype)
    b = torch.randn(2 * channels, generator=generator).to(DEVICE, dtype) if bias else None
    expected = depthwise_glu(x, weight, b).float()
    actual = fused_depthwise_glu(x, weight, b)
    assert actual.shape == (batch, height, width, channels) and actual.dtype == dtype
    # relative to the largest output: bf16's convolution rounds its 2C-channel output before the gate, the kernel not
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected, atol=TOLERANCE[dtype] * scale, rtol=0)


def block_inputs(shape: tuple[int, int, int], dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """A residual stream, an update, and the six (B, 1, C) modulation vectors as a Sana block slices them (views of
    one (B, 6, C) tensor, batch stride 6·C); the stream is offset so the norm's mean matters."""
    batch, _, width = shape
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(6, width, generator=generator)
    modulation = table[None] + torch.randn(batch, 6, width, generator=generator)
    vectors = modulation.to(DEVICE, dtype).chunk(6, dim=1)
    return {
        "x": (3 * torch.randn(shape, generator=generator) + 1).to(DEVICE, dtype),
        "update": torch.randn(shape, generator=generator).to(DEVICE, dtype),
        "shift": vectors[0],
        "scale": vectors[1],
        "gate": vectors[2],
        "weight": torch.randn(width, generator=generator).to(DEVICE, dtype),
        "bias": torch.randn(width, generator=generator).to(DEVICE, dtype),
    }


# widths that are not powers of two (the full model's is 2240): a small one, and the real one (a 4096-lane row)
WIDTHS = pytest.mark.parametrize("shape", [(2, 5, 70), (1, 3, 2240)], ids=["width-70", "width-2240"])


@WIDTHS
@pytest.mark.parametrize("residual", ["none", "plain", "gated"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_norm_modulate_matches_the_plain_ops(shape, residual, affine, dtype):
    t = block_inputs(shape, dtype, seed=2)
    update = None if residual == "none" else t["update"]
    gate = t["gate"] if residual == "gated" else None
    weight, bias = (t["weight"], t["bias"]) if affine else (None, None)
    args = (t["x"], update, gate, t["scale"], t["shift"], weight, bias, 1e-6)
    expected_stream, expected = norm_modulate(*args)
    stream, normed = fused_norm_modulate(*args)
    assert stream.dtype == normed.dtype == dtype and stream.shape == normed.shape == shape
    for actual, wanted in ((stream, expected_stream), (normed, expected)):
        scale = wanted.float().abs().max().item()
        torch.testing.assert_close(actual.float(), wanted.float(), atol=TOLERANCE[dtype] * scale, rtol=0)
    if update is None:
        assert torch.equal(stream, t["x"])


@WIDTHS
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_gated_residual_matches_the_plain_ops(shape, gated, dtype):
    t = block_inputs(shape, dtype, seed=3)
    gate = t["gate"] if gated else None
    expected = gated_residual(t["x"], t["update"], gate).float()
    actual = fused_gated_residual(t["x"], t["update"], gate)
    assert actual.dtype == dtype and actual.shape == shape
    torch.testing.assert_close(actual.float(), expected, atol=TOLERANCE[dtype] * expected.abs().max().item(), rtol=0)


def test_an_edit_with_the_kernels_matches_the_plain_ops(tiny_checkpoint):
    pipe = EditPipeline.from_pretrained(tiny_checkpoint, device=DEVICE, dtype=torch.float32, kernels="triton")
    assert pipe.speed.kernels_active, pipe.speed.notes

    def latents() -> torch.Tensor:
        # At the photo's own small size (no 512² bin): the interpreter runs each kernel program in Python.
        result = pipe(PHOTO, "add a hat", num_inference_steps=2, seed=3, output_type="latent", resolution_binning=False)
        return result.latents

    blocks = pipe.transformer.transformer_blocks
    assert all(b.norm_modulate is not norm_modulate and b.gated_residual is not gated_residual for b in blocks)
    fused = latents()
    assert pipe.speed.set_kernels("off") == "Triton kernels off" and not pipe.speed.kernels_active
    assert all(b.norm_modulate is norm_modulate and b.gated_residual is gated_residual for b in blocks)
    plain = latents()
    assert not torch.equal(fused, plain)  # the kernels ran: sums in another order round differently
    torch.testing.assert_close(fused, plain, atol=5e-5, rtol=1e-6)


def test_compiled_blocks_with_the_kernels_match_the_eager_kernels(tiny_checkpoint):
    """Regional compilation over blocks that call the kernels (dynamo's eager backend: its graph capture and graph
    breaks are inductor's, without the C++ build). On the CPU the interpreted kernels run between compiled graphs."""
    pipe = EditPipeline.from_pretrained(tiny_checkpoint, device=DEVICE, dtype=torch.float32, kernels="triton")
    transformer = pipe.transformer
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(1, transformer.config.in_channels, 6, 8, generator=generator).to(DEVICE)
    context = torch.randn(1, 5, transformer.config.caption_channels, generator=generator).to(DEVICE)
    timestep = torch.tensor([500.0], device=DEVICE)
    with torch.no_grad():
        eager = transformer(latents, context, timestep)
        assert "compiled" in pipe.speed.compile(backend="eager") and pipe.speed.kernels_active
        compiled = transformer(latents, context, timestep)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)


def test_without_cuda_or_the_interpreter_the_plain_ops_run_with_a_note(tiny_pipe, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = kernels_unavailable(torch.device("cpu"))
    assert reason == "the Triton kernels need a CUDA device, and this pipeline runs on cpu"
    with pytest.warns(RuntimeWarning, match="Triton kernels skipped"):
        note = tiny_pipe.speed.set_kernels("triton")
    assert note == f"Triton kernels skipped: {reason}" and note in tiny_pipe.speed.notes
    assert not tiny_pipe.speed.kernels_active and tiny_pipe.speed.kernels == "off"
    tiny_pipe.speed.notes.remove(note)
