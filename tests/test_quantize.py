"""``--quantize fp8``: the quantise/dequantise numerics, emulated in float32 on the CPU, and the refusal elsewhere.

Tolerances come from float8 e4m3 itself (3 mantissa bits): rounding a normal value moves it by at most half a unit
in the last place, 2⁻⁴ of it; below the smallest normal (2⁻⁶ of the row's scale unit) by at most 2⁻¹⁰ scale units.
A product of two such operands, over a long random sum, keeps its relative (Frobenius) error under 2 × 2⁻⁴.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_photo
from torch import nn

from compactedit_cli.errors import UsageError
from compactedit_cli.speed.plan import SpeedRequest
from compactedit_cli.speed.quantize import (
    FP8,
    FP8_MAX,
    Fp8Linear,
    fake_quantized_linear,
    fp8_unsupported,
    quantize_linears,
    quantize_rows,
)

HALF_ULP = 2.0**-4
SUBNORMAL_STEP = 2.0**-10  # half the spacing below e4m3's smallest normal, in units of the row's scale


def _gaussian(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_rows_round_trip_within_float8s_precision():
    x = _gaussian(32, 512, seed=0) * torch.logspace(-3, 3, 32).unsqueeze(1)  # rows six decades apart
    x[5] = 0.0  # an all-zero row keeps a finite scale
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (32, 1) and torch.isfinite(scale).all()
    assert q.float().abs().amax(dim=1)[torch.arange(32) != 5].eq(FP8_MAX).all()  # each row's largest hits 448
    error = (q.float() * scale - x).abs()
    assert (error <= HALF_ULP * x.abs() + SUBNORMAL_STEP * scale).all()
    assert q[5].float().eq(0).all()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_fp8_linear_is_close_to_the_float32_one(bias):
    linear = nn.Linear(1024, 256, bias=bias)
    x = _gaussian(4, 64, 1024, seed=1)
    with torch.no_grad():
        expected = linear(x)
        layer = Fp8Linear(linear)
        assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (1, 256)
        actual = fake_quantized_linear(x, layer.weight, layer.weight_scale.reshape(-1, 1), layer.bias)
    relative = (actual - expected).norm() / expected.norm()
    assert 0 < relative < 2 * HALF_ULP, relative
    assert relative > 4 * 2.0**-9  # the quantisation really happened: bf16's rounding (2⁻⁹) alone is far closer


def test_quantize_linears_replaces_every_linear_in_place():
    model = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Sequential(nn.Linear(32, 16, bias=False)))
    assert quantize_linears(model) == 2
    assert isinstance(model[0], Fp8Linear) and isinstance(model[2][0], Fp8Linear) and model[2][0].bias is None
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert {name: b.dtype for name, b in model.named_buffers()}["0.weight"] == FP8


def test_an_edit_through_emulated_fp8_stays_near_the_float32_one(tiny_checkpoint):
    """The whole tiny DiT in FP8 (off CUDA each Fp8Linear runs the float32 emulation): a few per cent, like one layer;
    a transposed weight or a lost scale would move the latents by about their own size."""
    import numpy as np
    from PIL import Image

    from compactedit_cli.engine.pipeline import EditPipeline

    pipe = EditPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))

    def latents() -> torch.Tensor:
        return pipe(photo, "add a hat", num_inference_steps=3, seed=3, output_type="latent").latents

    plain = latents()
    blocks = pipe.transformer.transformer_blocks
    assert quantize_linears(blocks) == 10 * len(blocks)  # q, k, v, out of both attentions; both 1×1 convolutions
    relative = ((latents() - plain).norm() / plain.norm()).item()
    assert 4 * 2.0**-9 < relative < 2 * HALF_ULP, relative


def test_fp8_is_refused_on_the_cpu_before_loading():
    reason = fp8_unsupported(torch.device("cpu"))
    assert reason == "--quantize fp8 needs an NVIDIA GPU with FP8 tensor cores (Ada, Hopper or newer), not cpu"
    with pytest.raises(UsageError, match="needs an NVIDIA GPU"):
        SpeedRequest(quantize="fp8").load_device(torch.device("cpu"))
    assert SpeedRequest(quantize="none").load_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--quantize", "fp8"], "error: --quantize fp8 needs an NVIDIA GPU with FP8 tensor cores"),
        (["--quantize", "int4"], "error: --quantize must be one of none, fp8 (got 'int4')"),
        (["--quantize", "fp8", "--offload", "model"], "error: --quantize fp8 and --offload do not mix yet"),
        (["--kernels", "cuda"], "error: --kernels must be one of off, triton (got 'cuda')"),
    ],
)
def test_edit_refuses_with_one_line_and_writes_nothing(cli, tiny_checkpoint, tmp_path, flags, line):
    photo = make_photo(tmp_path / "in.png")
    out = tmp_path / "out.png"
    result = cli("edit", photo, "x", "-o", out, "-m", tiny_checkpoint, "--device", "cpu", "--steps", "1", *flags)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().startswith(line) and result.stderr.strip().count("\n") == 0, result.stderr
    assert not out.exists()


def test_bench_refuses_fp8_before_building_the_model(cli):
    result = cli("bench", "--random-weights", "tiny", "--device", "cpu", "--quantize", "fp8", "--steps", "1")
    assert result.exit_code == 2 and "error: --quantize fp8 needs an NVIDIA GPU" in result.stderr, result.stderr


FP8_DEVICE = pytest.mark.skipif(
    not torch.cuda.is_available() or fp8_unsupported(torch.device("cuda")) is not None,
    reason="needs a GPU with FP8 (run by scripts/gpu_bench.sh)",
)


@FP8_DEVICE
def test_scaled_mm_matches_the_emulation_on_the_gpu():
    linear = nn.Linear(2240, 5600).cuda().bfloat16()
    x = _gaussian(2, 300, 2240, seed=2).cuda().bfloat16()
    with torch.no_grad():
        layer = Fp8Linear(linear)
        actual = layer(x).float()
        emulated = fake_quantized_linear(x.float(), layer.weight, layer.weight_scale.reshape(-1, 1), layer.bias)
        reference = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    assert (actual - emulated).norm() / emulated.norm() < 1e-2  # the same rounding, bf16 output
    assert (actual - reference).norm() / reference.norm() < 2 * HALF_ULP
