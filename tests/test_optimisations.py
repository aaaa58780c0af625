"""Every speed and memory option against the plain path, on the CPU in float32.

Tolerance: final latents (which reach about ±13 here) within ``atol=5e-5, rtol=1e-6`` of the plain path: float32
rounding, since the channels-last DC-AE, compiled blocks and fused kernels sum in other orders. A wrong
weight, layout or branch moves latents by whole units. Offload only moves weights, so on one device it must be
bit-identical.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from compactedit_cli import options
from compactedit_cli.engine.pipeline import EditPipeline
from compactedit_cli.errors import UsageError
from compactedit_cli.models.dcae import DCAE, DCAEConfig
from compactedit_cli.random_weights.full import build_vae
from compactedit_cli.random_weights.tiny import TinySpec, vae_config
from compactedit_cli.speed.compiling import compile_unavailable
from compactedit_cli.speed.tiling import tiled_decode, vae_activation_bytes

ATOL, RTOL = 5e-5, 1e-6
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by scripts/gpu_bench.sh)")
PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))


@pytest.fixture
def pipe(tiny_checkpoint) -> EditPipeline:
    """A fresh pipeline per test: the options under test change its state."""
    return EditPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)


def _latents(pipe: EditPipeline, **kwargs) -> torch.Tensor:
    result = pipe(PHOTO, ["add a hat", "remove the car"], num_inference_steps=3, seed=3, output_type="latent", **kwargs)
    return result.latents


@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_linear_attention_matches_diffusers(qk_norm, dtype, atol):
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

    from compactedit_cli.models.attention import LinearSelfAttention

    torch.manual_seed(0)
    reference = SanaTransformerBlock(dim=64, num_attention_heads=4, attention_head_dim=16, qk_norm=qk_norm).attn1
    reference.set_processor(SanaLinearAttnProcessor2_0())
    ours = LinearSelfAttention(64, 4, 16, bias=True, qk_norm_form=qk_norm, dropout=0.0)  # the block default
    ours.load_state_dict(reference.state_dict(), strict=True)
    reference, ours = reference.to(dtype).eval(), ours.to(dtype).eval()
    x = torch.randn(3, 40, 64, dtype=dtype)
    with torch.no_grad():
        expected, actual = reference(x), ours(x)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_cross_attention_with_ready_keys_and_values_matches_diffusers(qk_norm, dtype, atol):
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

    from compactedit_cli.models.attention import CrossAttention

    torch.manual_seed(0)
    block = SanaTransformerBlock(
        dim=64, num_attention_heads=4, attention_head_dim=16, num_cross_attention_heads=2,
        cross_attention_head_dim=24, cross_attention_dim=48, qk_norm=qk_norm,
    )  # fmt: skip
    ours = CrossAttention(64, 48, 2, 24, qk_norm_form=qk_norm, dropout=0.0)
    ours.load_state_dict(block.attn2.state_dict(), strict=True)
    reference, ours = block.attn2.to(dtype).eval(), ours.to(dtype).eval()
    x, context = torch.randn(3, 40, 64, dtype=dtype), torch.randn(3, 7, 48, dtype=dtype)
    with torch.no_grad():
        expected = reference(x, encoder_hidden_states=context)
        from_context = ours(x, context)
        ready = ours(x, ours.keys_values(context))
    for actual in (from_context, ready):
        assert actual.dtype == dtype
        torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=0)


@pytest.mark.parametrize(("affine", "bias"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 2e-6), (torch.bfloat16, 0.0)])
@pytest.mark.parametrize("slice_elements", [2**25, 300, 1], ids=["whole", "slices", "rows"])
def test_rms_norm_matches_diffusers(affine, bias, dtype, atol, slice_elements, monkeypatch):
    """Same dtype, strides and (bf16: identical) values as diffusers' RMSNorm, on the DC-AE's permuted layout."""
    from diffusers.models.normalization import RMSNorm as ReferenceRMSNorm

    from compactedit_cli.models.norm import RMSNorm

    torch.manual_seed(0)
    reference = ReferenceRMSNorm(64, eps=1e-5, elementwise_affine=affine, bias=bias)
    for param in reference.parameters():
        torch.nn.init.normal_(param)
    reference = reference.to(dtype)
    ours = RMSNorm(64, eps=1e-5, elementwise_affine=affine, bias=bias)
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours = ours.to(dtype)
    x = (torch.randn(2, 64, 9, 7) * 3).to(dtype).movedim(1, -1)  # what the DC-AE's blocks hand their norms
    expected = reference(x)
    monkeypatch.setattr(RMSNorm, "slice_elements", slice_elements)
    actual = ours(x)
    assert (actual.dtype, actual.stride()) == (expected.dtype, expected.stride())
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def test_sliced_norms_change_no_edit(pipe, monkeypatch):
    """Norms run in slices of a few rows (as at 2K) give the same pixels as norms run whole."""
    from compactedit_cli.models.norm import RMSNorm

    whole = pipe(PHOTO, "add a hat", num_inference_steps=2, seed=5).images[0]
    monkeypatch.setattr(RMSNorm, "slice_elements", 64)
    sliced = pipe(PHOTO, "add a hat", num_inference_steps=2, seed=5).images[0]
    difference = np.abs(np.asarray(sliced, dtype=np.int16) - np.asarray(whole, dtype=np.int16))
    assert difference.max() <= 1


def test_the_vae_runs_channels_last(pipe):
    kernels = [p for p in pipe.vae.parameters() if p.dim() == 4 and p.shape[-1] > 1 and p.shape[1] > 1]
    assert kernels
    assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in kernels)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_token_feed_forward_matches_glumbconv(dtype, atol):
    from diffusers.models.transformers.sana_transformer import GLUMBConv as ReferenceGLUMBConv

    from compactedit_cli.models.feedforward import GLUMBConv

    torch.manual_seed(0)
    reference = ReferenceGLUMBConv(32, 32, expand_ratio=2.5, norm_type=None, residual_connection=False)
    ours = GLUMBConv(32, 2.5)
    ours.load_state_dict(reference.state_dict(), strict=True)
    reference, ours = reference.to(dtype).eval(), ours.to(dtype).eval()
    tokens = torch.randn(2, 6, 5, 32, dtype=dtype)
    with torch.no_grad():
        expected = reference(tokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # what Sana's block passes
        actual = ours(tokens)
    assert actual.shape == expected.shape and actual.dtype == dtype
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)
    assert actual.flatten(1, 2).is_contiguous()  # the block's flatten back to tokens stays a view


def test_sequential_offload_leaves_the_keys_and_values_to_the_streamed_blocks(pipe, monkeypatch):
    """Streamed blocks have their weights only inside their own forward, so nothing may use them before it."""
    ready = []
    original = pipe.transformer.context_keys_values
    monkeypatch.setattr(pipe.transformer, "context_keys_values", lambda p: ready.append(1) or original(p))
    _latents(pipe)
    assert ready == [1]  # once per edit, not per step
    pipe.speed.set_offload("sequential")
    _latents(pipe)
    assert ready == [1]


def test_denoise_loop_reads_no_tensor_values(pipe, monkeypatch):
    """A CPU stand-in for the CUDA sync check: nothing in the loop pulls a value from a tensor to Python."""
    conditioning = pipe.encode_prompt([PHOTO], ["add a hat"])
    image_latents = pipe.encode_image([PHOTO], 512, 512)
    noise = pipe.initial_noise(1, 512, 512, 0)
    set_timesteps = pipe.scheduler.set_timesteps

    def forbid(*_args, **_kwargs):
        raise AssertionError("a tensor value was read on the host inside the denoise loop")

    def set_timesteps_then_forbid(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "nonzero"):
            monkeypatch.setattr(torch.Tensor, name, forbid)
        monkeypatch.setattr(torch, "nonzero", forbid)

    monkeypatch.setattr(pipe.scheduler, "set_timesteps", set_timesteps_then_forbid)
    guidance = pipe.default_guidance()
    latents = pipe.denoise(noise, image_latents, conditioning.cond, conditioning.null, guidance, 4)
    monkeypatch.undo()
    assert torch.isfinite(latents).all()


@CUDA
def test_denoise_loop_never_syncs_on_cuda(tiny_checkpoint):
    pipe = EditPipeline.from_pretrained(tiny_checkpoint, device="cuda", dtype=torch.bfloat16, sync_check=True)
    assert pipe.speed.sync_check and not pipe.speed.notes
    result = pipe(PHOTO, "add a hat", num_inference_steps=4, output_type="latent")
    assert torch.isfinite(result.latents).all()


def test_cuda_graphs_are_skipped_with_a_message_off_cuda(pipe, tiny_checkpoint):
    with pytest.warns(RuntimeWarning, match="CUDA graphs skipped"):
        message = pipe.speed.use_graphs()
    assert "cpu" in message and pipe.speed.graphs is None and pipe.speed.notes == [message]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = EditPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, cuda_graphs=True)
    assert loaded.speed.graphs is None and loaded.speed.notes == [message]
    assert not [w for w in caught if "skipped" in str(w.message)]  # loading notes it instead of warning


def test_the_loop_calls_the_graphed_step_with_the_projected_context(pipe, monkeypatch):
    """The wiring the CUDA graph relies on: every step goes through it with (input, (keys, values), timestep).

    Off CUDA a ``GraphedStep`` calls its step directly, so the latents must equal the fast path's exactly.
    """
    from compactedit_cli.speed.graphs import GraphedStep

    eager = _latents(pipe)
    calls = []

    def step(x, context, t):
        calls.append((x.shape, context[0].shape, t.shape))
        return pipe.transformer.forward_projected(x, context, t)

    pipe.speed._graphs = GraphedStep(step)  # off CUDA, use_graphs() would not install one
    torch.testing.assert_close(_latents(pipe), eager, atol=0, rtol=0)
    assert len(calls) == 3 and pipe.speed.graphs.captures == 0  # 3 steps, nothing captured on the CPU
    (x_shape, keys_shape, t_shape) = calls[0]
    assert x_shape[0] == keys_shape[1] == t_shape[0] == 2 * 3  # two rows, three guidance branches
    assert keys_shape[0] == len(pipe.transformer.transformer_blocks)  # every block's keys, computed before the loop
    with pytest.raises(UsageError, match=re.escape(options.GRAPHS_AND_OFFLOAD)):
        pipe.speed.set_offload("model")  # a graph replays fixed weight addresses
    assert pipe.speed.offload == "none"
    graphed = pipe.speed.graphs
    released = []
    release = graphed.release
    monkeypatch.setattr(graphed, "release", lambda: released.append(1) or release())
    pipe.speed.release_memory()  # what the CLI calls after running out of memory: the pool goes, the graph stays on
    assert released == [1] and pipe.speed.graphs is graphed
    torch.testing.assert_close(_latents(pipe), eager, atol=0, rtol=0)


@CUDA
def test_cuda_graphs_match_eager_and_capture_once_per_size(tiny_checkpoint):
    pipe = EditPipeline.from_pretrained(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    eager = _latents(pipe)
    assert "CUDA graph" in pipe.speed.use_graphs()
    pipe.speed.check_syncs()  # replays must not sync either
    graphed = _latents(pipe)
    assert pipe.speed.graphs.failure is None and pipe.speed.graphs.captures == 1
    torch.testing.assert_close(graphed, eager, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(_latents(pipe), graphed, atol=1e-3, rtol=1e-3)  # a second edit: replays only
    assert pipe.speed.graphs.captures == 1
    pipe.speed.release_memory()  # drops the graph's pool: the next edit captures again
    torch.testing.assert_close(_latents(pipe), graphed, atol=1e-3, rtol=1e-3)
    assert pipe.speed.graphs.captures == 2
    wide = pipe(PHOTO, "add a hat", num_inference_steps=2, seed=3, width=256, height=128, output_type="latent")
    assert pipe.speed.graphs.captures == 3 and torch.isfinite(wide.latents).all()


@CUDA
def test_graphed_step_replays_new_inputs_and_captures_again_for_new_shapes():
    from compactedit_cli.speed.graphs import GraphedStep

    def step(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ w) + 1

    graphed = GraphedStep(step)
    w = torch.randn(8, 8, device="cuda")
    results = []
    for scale in (1.0, -2.0, 3.0):  # the first call answers from its warm-up, the rest replay
        x = torch.randn(5, 8, device="cuda") * scale
        results.append(graphed(x, w))
        torch.testing.assert_close(results[-1], step(x, w))
    assert graphed.captures == 1 and results[0].data_ptr() != results[1].data_ptr()
    x = torch.randn(3, 8, device="cuda")
    torch.testing.assert_close(graphed(x, w), step(x, w))
    assert graphed.captures == 2


@CUDA
def test_a_step_a_cuda_graph_cannot_hold_runs_eagerly_after_one_warning():
    from compactedit_cli.speed.graphs import GraphedStep

    def step(x: torch.Tensor) -> torch.Tensor:
        return x * x.sum().item()  # a host read: fine eagerly, not allowed while capturing

    graphed = GraphedStep(step)
    x = torch.arange(4.0, device="cuda")
    with pytest.warns(RuntimeWarning, match="capture failed"):
        torch.testing.assert_close(graphed(x), step(x))
    assert graphed.failure and graphed.captures == 0
    torch.testing.assert_close(graphed(x + 1), step(x + 1))


def test_no_compiling_turns_a_compile_into_an_error_and_lets_cached_code_run():
    """What keeps a compile out of a CUDA graph capture; dynamo's guards are the same on the CPU."""
    from compactedit_cli.speed.graphs import no_compiling

    torch._dynamo.reset()
    double = torch.compile(lambda x: x * 2, backend="eager")
    x = torch.ones(3)
    double(x)
    with no_compiling():
        torch.testing.assert_close(double(x + 1), x * 4)  # compiled for this shape already
        with pytest.raises(RuntimeError, match="recompile"):
            double(torch.ones(2, 2))
    torch.testing.assert_close(double(torch.ones(2, 2)), torch.full((2, 2), 2.0))  # compiles again outside


@CUDA
def test_cuda_graphs_over_compiled_blocks_match_eager(tiny_checkpoint):
    pipe = EditPipeline.from_pretrained(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    eager = _latents(pipe)
    pipe.speed.compile()
    pipe.speed.use_graphs()
    torch.testing.assert_close(_latents(pipe), eager, atol=2e-2, rtol=2e-2)
    assert pipe.speed.graphs.failure is None and pipe.speed.graphs.captures == 1


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_gives_identical_results_and_moves_weights_per_stage(pipe, mode, monkeypatch):
    pipe.speed.set_vae_tiling(False)  # keep the comparison to offload alone
    plain = _latents(pipe)
    pipe.speed.set_offload(mode)
    offloader = pipe.speed._offloader
    entered: list[str] = []
    stage = offloader.stage
    monkeypatch.setattr(offloader, "stage", lambda name: entered.append(name) or stage(name))
    uploads = []
    onload = offloader._onload
    monkeypatch.setattr(offloader, "_onload", lambda params: uploads.append(params) or onload(params))
    assert torch.equal(_latents(pipe), plain)
    assert entered == ["prompt", "image", "denoise"]
    stages = len(entered)
    if mode == "sequential":  # every VLM layer, ViT block, edit-head block, VAE stage and DiT block per step
        assert len(uploads) > stages + 3 * len(pipe.transformer.transformer_blocks)
    else:
        assert len(uploads) == stages


def test_offload_none_restores_the_plain_pipeline(pipe):
    pipe.speed.set_vae_tiling(False)
    plain = _latents(pipe)
    pipe.speed.set_offload("sequential")
    pipe.speed.set_offload("none")
    assert pipe.speed._offloader is None and pipe.speed.offload == "none"
    assert all(not block._forward_pre_hooks for block in pipe.transformer.transformer_blocks)
    assert torch.equal(_latents(pipe), plain)


def test_unknown_offload_mode_is_a_usage_error(pipe, tiny_checkpoint):
    with pytest.raises(UsageError, match="offload"):
        pipe.speed.set_offload("disk")
    with pytest.raises(UsageError, match="offload"):
        EditPipeline.from_pretrained(tiny_checkpoint, device="cpu", offload="gpu")
    with pytest.raises(UsageError, match=re.escape(options.GRAPHS_AND_OFFLOAD)):  # refused before loading
        EditPipeline.from_pretrained(tiny_checkpoint / "missing", device="cpu", offload="model", cuda_graphs=True)
    with pytest.raises(UsageError, match="vae_tiling"):
        pipe.speed.set_vae_tiling("auto")


def test_from_pretrained_offload_loads_and_edits(tiny_checkpoint, pipe):
    offloaded = EditPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, offload="model")
    assert offloaded.speed.offload == "model" and not offloaded.speed.notes
    offloaded.speed.set_vae_tiling(False)
    pipe.speed.set_vae_tiling(False)
    assert torch.equal(_latents(offloaded), _latents(pipe))


def _count_decoder_calls(vae) -> list[int]:
    calls: list[int] = []
    vae.decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_tiled_decode_is_exact_away_from_tile_seams():
    """With a local decoder (ResBlocks only), tiling may only change pixels near the seams."""
    config = vae_config(TinySpec())
    config["decoder_block_types"] = config["encoder_block_types"] = ["ResBlock"] * 6
    config["decoder_qkv_multiscales"] = config["encoder_qkv_multiscales"] = [[]] * 6
    vae: DCAE = build_vae(config, torch.Generator().manual_seed(2), torch.device("cpu"), torch.float32)
    assert isinstance(vae.config, DCAEConfig)
    z = torch.randn(1, config["latent_channels"], 16, 16, generator=torch.Generator().manual_seed(1))
    calls = _count_decoder_calls(vae)
    with torch.no_grad():
        whole = vae.decode(z)
        tiled = tiled_decode(vae.decoder, z, 32, 384, 256)  # 512² output: 2x2 tiles of 384² overlapping by 128
    assert len(calls) == 1 + 4
    torch.testing.assert_close(tiled[..., :200, :200], whole[..., :200, :200], atol=1e-5, rtol=1e-6)
    assert torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1] > 0.98


def test_pipeline_decode_tiles_when_asked_and_stays_close(pipe):
    """The tiny VAE's EfficientViT blocks attend over the whole (tile) image, so tiles match only approximately."""
    z = torch.randn(1, pipe.latent_channels, 16, 16, generator=torch.Generator().manual_seed(1))
    calls = _count_decoder_calls(pipe.vae)
    pipe.speed.set_vae_tiling(False)
    whole = pipe.decode(z)
    assert not pipe.speed.vae_tiled
    pipe.speed.set_vae_tiling(True, tile=384, stride=256)
    tiled = pipe.decode(z)
    assert pipe.speed.vae_tiled and pipe.speed.vae_tile == (384, 256)
    assert len(calls) == 1 + 4
    assert tiled.shape == whole.shape
    assert torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1] > 0.9


def test_automatic_vae_tiling_rule(pipe, monkeypatch):
    speed = pipe.speed
    assert speed.vae_tiling is None and not speed.uses_vae_tiling(1, 2048, 2048)  # the CPU reports no free memory
    monkeypatch.setattr("compactedit_cli.speed.plan.free_device_bytes", lambda _device: 2**29)
    assert speed.uses_vae_tiling(1, 2048, 2048)  # the tiny VAE at fp32 2048² needs more than that by the estimate
    assert not speed.uses_vae_tiling(1, 1024, 1024)
    calls = _count_decoder_calls(pipe.vae)
    with monkeypatch.context() as short:  # the VAE stages apply the decision: 512² needs more than this, 256² less
        short.setattr("compactedit_cli.speed.plan.free_device_bytes", lambda _device: 2**25)
        speed.set_vae_tiling(None, tile=384, stride=256)
        speed.vae_decode(torch.zeros(1, pipe.latent_channels, 16, 16))
        assert speed.vae_tiled and len(calls) == 4
        speed.vae_decode(torch.zeros(1, pipe.latent_channels, 8, 8))
        assert not speed.vae_tiled and len(calls) == 5
    with pytest.raises(UsageError, match="vae_tile stride must be between 32 and 256"):
        speed.set_vae_tiling(True, tile=256, stride=300)  # tiles that leave gaps
    speed.set_vae_tiling(False)
    assert not speed.uses_vae_tiling(1, 2048, 2048)
    speed.set_vae_tiling(None)
    speed.set_offload("model")  # offload alone does not tile: tiling changes pixels, so only when memory is short
    monkeypatch.setattr("compactedit_cli.speed.plan.free_device_bytes", lambda _device: 2**40)
    assert not speed.uses_vae_tiling(1, 2048, 2048)
    config = pipe.vae.config
    assert vae_activation_bytes(config, 2, 64, 64, torch.bfloat16) * 2 == vae_activation_bytes(
        config, 2, 64, 64, torch.float32
    )


def test_compile_code_path_matches_eager(pipe):
    plain = _latents(pipe)
    message = pipe.speed.compile(backend="eager")
    assert pipe.speed.compiled and "compiled" in message
    torch.testing.assert_close(_latents(pipe), plain, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
@pytest.mark.skipif(compile_unavailable("inductor", torch.device("cpu")) is not None, reason="inductor cannot run")
def test_inductor_compile_matches_eager(pipe):
    plain = _latents(pipe)
    pipe.speed.compile()
    torch.testing.assert_close(_latents(pipe), plain, atol=ATOL, rtol=RTOL)


def test_compile_is_skipped_with_a_message_where_it_cannot_run(pipe, tiny_checkpoint, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda _name: None)
    assert "C++ compiler" in compile_unavailable("inductor", torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match="torch.compile skipped"):
        message = pipe.speed.compile()
    assert "skipped" in message and not pipe.speed.compiled and pipe.speed.notes == [message]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = EditPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, compile=True)
    assert not loaded.speed.compiled and loaded.speed.notes == [message]
    assert not [w for w in caught if "skipped" in str(w.message)]  # loading notes it instead of warning
    assert _latents(loaded).shape == _latents(pipe).shape


def test_batched_requests_use_one_forward_per_step(pipe):
    """Guidance branches and batch rows go through the transformer together: one call per step."""
    calls: list[int] = []
    pipe.transformer.patch_embed.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    _latents(pipe)
    assert calls == [3 * 2] * 3  # 3 branches x 2 instructions, 3 steps
