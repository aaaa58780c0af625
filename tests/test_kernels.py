"""The fused Triton kernels (``--kernels triton``) against the plain torch ops, in Triton's interpreter on the CPU.

Tolerance: float32 inputs within ``atol=1e-5`` of the plain ops (same sums in another order; outputs here reach
about ±70). bf16 inputs within ``atol=2e-2`` of the plain ops (one bf16 rounding of the output). Through a whole
tiny edit the final latents stay within the fast path's own tolerance of the plain kernels' (test_optimisations).
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
from compactedit_cli.speed.kernels import kernels_unavailable

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[kernels]')")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if kernels_unavailable(DEVICE) is not None:
    pytest.skip(f"Triton kernels cannot run here: {kernels_unavailable(DEVICE)}", allow_module_level=True)

from compactedit_cli.speed.kernels.depthwise_glu import depthwise_glu as fused_depthwise_glu  # noqa: E402
from compactedit_cli.speed.kernels.linear_attention import linear_attention as fused_linear_attention  # noqa: E402

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


def test_an_edit_with_the_kernels_matches_the_plain_ops(tiny_checkpoint):
    pipe = EditPipeline.from_pretrained(tiny_checkpoint, device=DEVICE, dtype=torch.float32, kernels="triton")
    assert pipe.speed.kernels_active, pipe.speed.notes

    def latents() -> torch.Tensor:
        return pipe(PHOTO, "add a hat", num_inference_steps=2, seed=3, output_type="latent").latents

    fused = latents()
    assert pipe.speed.set_kernels("off") == "Triton kernels off" and not pipe.speed.kernels_active
    plain = latents()
    assert not torch.equal(fused, plain)  # the kernels ran: sums in another order round differently
    torch.testing.assert_close(fused, plain, atol=5e-5, rtol=1e-6)


def test_without_cuda_or_the_interpreter_the_plain_ops_run_with_a_note(tiny_pipe, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = kernels_unavailable(torch.device("cpu"))
    assert reason == "the Triton kernels need a CUDA device, and this pipeline runs on cpu"
    with pytest.warns(RuntimeWarning, match="Triton kernels skipped"):
        note = tiny_pipe.speed.set_kernels("triton")
    assert note == f"Triton kernels skipped: {reason}" and note in tiny_pipe.speed.notes
    assert not tiny_pipe.speed.kernels_active and tiny_pipe.speed.kernels == "off"
    tiny_pipe.speed.notes.remove(note)
