"""Our Qwen3-VL encoder against transformers' ``Qwen3VLForConditionalGeneration``, both loaded from one file.

transformers stays installed as the independent reference (``random_weights.tiny`` builds checkpoints with it).
Each config variant is written as a real ``text_encoder/`` folder (config.json + safetensors) and read by both
loaders; vision features, DeepStack features, the 3-D rope index and the meta-query states through
:class:`VLMConditioner` are compared in float32 (tight) and bfloat16 (as close as transformers' own bf16 is to its
float32).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from compactedit_cli.engine.conditioning import VLMConditioner
from compactedit_cli.errors import CheckpointError
from compactedit_cli.loading.checkpoint import load_text_encoder
from compactedit_cli.random_weights.tiny import TinySpec, build_text_encoder, text_encoder_config

INSTRUCTIONS = ["add a hat", "make the whole sky a deep shade of purple, as at dusk after a long summer day"]


def _tiny() -> dict:
    return text_encoder_config(TinySpec())


def _variant_v5_mha_bias() -> dict:
    """transformers-5 ``rope_parameters``, no grouped queries, biased projections, a different M-RoPE split."""
    config = _tiny()
    text = config["text_config"]
    del text["rope_scaling"], text["rope_theta"]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text["num_key_value_heads"] = text["num_attention_heads"]
    text["attention_bias"] = True
    config["vision_config"].update(hidden_act="gelu", deepstack_visual_indexes=[1])
    return config


def _variant_deep() -> dict:
    """More blocks, DeepStack taps out of order and repeated, a smaller position grid, more text layers than taps."""
    config = _tiny()
    config["vision_config"].update(depth=3, deepstack_visual_indexes=[2, 0, 2], num_position_embeddings=36)
    config["text_config"].update(num_hidden_layers=3, hidden_act="gelu_pytorch_tanh")
    return config


VARIANTS = {"tiny": _tiny, "v5_mha_bias": _variant_v5_mha_bias, "deep": _variant_deep}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def write_text_encoder(folder: Path, config: dict, seed: int = 0) -> Path:
    """A ``text_encoder/`` folder as the tiny checkpoints write it: transformers' random model, no LM head."""
    model = build_text_encoder(config, torch.Generator().manual_seed(seed))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=list(VARIANTS))
def encoders(request, tmp_path_factory):
    """(ours, transformers') per dtype, from the same folder."""
    from transformers import Qwen3VLForConditionalGeneration

    folder = write_text_encoder(tmp_path_factory.mktemp(request.param) / "text_encoder", VARIANTS[request.param]())
    pairs = {}
    for name, dtype in DTYPES.items():
        ours = load_text_encoder(folder, torch.device("cpu"), dtype)
        reference = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
        pairs[name] = (ours, reference)
    return pairs


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def assert_matches(ours, reference, reference_f32, dtype_name: str, what: str) -> None:
    """float32: within 1e-5 relative of transformers. bf16: within a tenth of transformers' own bf16 rounding error
    of its bf16 result (the same ops in the same order round the same way)."""
    if dtype_name == "float32":
        assert relative_error(ours, reference_f32) < 1e-5, what
    else:
        assert relative_error(ours, reference) <= 0.1 * relative_error(reference, reference_f32), what


def random_patches(grid: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 8 * 8, generator=generator)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_vision_and_deepstack_features_match(encoders, dtype_name):
    grid = torch.tensor([[1, 6, 8], [1, 4, 4]])  # two images of different (non-square) sizes, packed
    pixels = random_patches(grid)
    with torch.inference_mode():
        reference_f32 = encoders["float32"][1].model.get_image_features(pixels, grid)
        ours, reference = encoders[dtype_name]
        tokens, deepstack = ours.image_features(pixels, grid)
        expected = reference.model.get_image_features(pixels, grid)
    assert tokens.dtype == DTYPES[dtype_name]
    assert_matches(
        tokens, torch.cat(expected.pooler_output), torch.cat(reference_f32.pooler_output), dtype_name, "tokens"
    )
    assert len(deepstack) == len(expected.deepstack_features) > 0
    for level, (mine, theirs, f32) in enumerate(
        zip(deepstack, expected.deepstack_features, reference_f32.deepstack_features, strict=True)
    ):
        assert_matches(mine, torch.cat(theirs), torch.cat(f32), dtype_name, f"deepstack {level}")


def test_rope_index_matches_for_ragged_rows(encoders):
    ours, reference = encoders["float32"]
    # Row 0: text, a 3x4 image, text, padding; row 1: text, a 2x2 image, more text (no padding).
    types = torch.tensor([[0, 0] + [1] * 12 + [0] * 3 + [0] * 4, [0] * 3 + [1] * 4 + [0] * 14])
    mask = torch.ones_like(types, dtype=torch.bool)
    mask[0, -4:] = False
    grid = torch.tensor([[1, 6, 8], [1, 4, 4]])
    expected, _ = reference.model.get_rope_index(torch.zeros_like(types), types, grid, None, attention_mask=mask)
    assert torch.equal(ours.rope_index(types, grid, mask), expected)


def reference_meta_states(reference, queries: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(position ids, meta states) through transformers' own API, as the conditioner computed them before."""
    vlm = reference.model
    mask = batch.attention_mask.bool()
    embeds = vlm.get_input_embeddings()(batch.input_ids)
    features = vlm.get_image_features(batch.pixel_values, batch.image_grid_thw)
    image_mask = batch.input_ids == reference.config.image_token_id
    embeds = embeds.masked_scatter(image_mask[..., None], torch.cat(features.pooler_output).to(embeds.dtype))
    deepstack = [torch.cat(level) for level in features.deepstack_features]
    queries = queries.to(embeds.dtype)
    n, lengths = queries.shape[0], mask.sum(1).tolist()

    def insert(rows: torch.Tensor, filler: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.cat([r[:v], filler, r[v:]]) for r, v in zip(rows, lengths, strict=True)])

    new_mask = insert(mask, torch.ones(n, dtype=torch.bool))
    new_types = insert(batch.mm_token_type_ids, torch.zeros(n, dtype=batch.mm_token_type_ids.dtype))
    ids = torch.zeros(new_mask.shape, dtype=torch.long)
    positions, _ = vlm.get_rope_index(ids, new_types, batch.image_grid_thw, None, attention_mask=new_mask)
    hidden = vlm.language_model(
        inputs_embeds=insert(embeds, queries),
        attention_mask=new_mask,
        position_ids=positions,
        visual_pos_masks=insert(image_mask, torch.zeros(n, dtype=torch.bool)),
        deepstack_visual_embeds=deepstack,
        use_cache=False,
    ).last_hidden_state
    return positions, torch.stack([row[v : v + n] for row, v in zip(hidden, lengths, strict=True)])


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from compactedit_cli.engine.processor import load_processor

    return load_processor(tiny_checkpoint / "tokenizer")


@pytest.mark.parametrize(
    ("rows", "dtype_name"),
    [(2, "float32"), (2, "bfloat16"), (1, "float32")],
    ids=["padded-pair-float32", "padded-pair-bfloat16", "single-float32"],
)
def test_meta_states_match_through_the_conditioner(encoders, processor, dtype_name, rows):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    hidden = encoders["float32"][0].config.text.hidden_size
    queries = torch.randn(5, hidden, generator=torch.Generator().manual_seed(1)) / hidden**0.5
    head = SimpleNamespace(meta_queries=queries)
    results = {}
    for name in ("float32", dtype_name):
        ours, reference = encoders[name]
        conditioner = VLMConditioner(processor, ours, head, min_pixels=32 * 32, max_pixels=48 * 64)
        batch = conditioner.prepare([image] * rows, INSTRUCTIONS[-rows:])
        with torch.inference_mode():
            inputs = conditioner.meta_inputs(batch)
            states = conditioner.meta_states(inputs)
            results[name] = (inputs, states, *reference_meta_states(reference, queries, batch))
    if rows == 2:
        assert not batch.attention_mask.bool().all()  # the shorter instruction is right-padded
    inputs, states, positions, expected = results[dtype_name]
    assert torch.equal(inputs.position_ids, positions)
    assert states.shape == (rows, 5, hidden) and states.dtype == DTYPES[dtype_name]
    assert_matches(states, expected, results["float32"][3], dtype_name, "meta states")


# ---- loading ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_text_encoder(tmp_path_factory.mktemp("tiny_te") / "text_encoder", _tiny())


def _copy(folder: Path, base: Path, config: dict | None = None, state: dict | None = None) -> Path:
    """A ``base/text_encoder`` folder from ``folder``, with another config or other tensors."""
    from safetensors.torch import load_file

    target = base / "text_encoder"
    target.mkdir(parents=True)
    tensors = load_file(folder / "model.safetensors") if state is None else state
    save_file(tensors, str(target / "model.safetensors"))
    (target / "config.json").write_text(json.dumps(config or json.loads((folder / "config.json").read_text())))
    return target


def test_older_key_layouts_load_to_the_same_weights(tiny_folder, tmp_path):
    """Pre-4.52 ``visual.*`` / ``model.*`` names, a doubly nested language model, and an LM head that is skipped."""
    from safetensors.torch import load_file

    state = load_file(tiny_folder / "model.safetensors")

    def old(key: str) -> str:
        return key.replace("model.visual.", "visual.").replace("model.language_model.", "model.")

    def nested(key: str) -> str:
        return key.replace("model.language_model.", "model.language_model.model.")

    head = {"lm_head.weight": state["model.language_model.embed_tokens.weight"].clone()}
    expected = load_text_encoder(tiny_folder, torch.device("cpu"), torch.float32).state_dict()
    for label, rename in (("old", old), ("nested", nested)):
        folder = _copy(tiny_folder, tmp_path / label, state={**{rename(k): v for k, v in state.items()}, **head})
        loaded = load_text_encoder(folder, torch.device("cpu"), torch.float32).state_dict()
        assert loaded.keys() == expected.keys(), label
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), label

    twice = _copy(tiny_folder, tmp_path / "twice", state={**state, **{old(k): v.clone() for k, v in state.items()}})
    with pytest.raises(CheckpointError, match="stored twice"):
        load_text_encoder(twice, torch.device("cpu"), torch.float32)


def _set(path: str, value):
    def change(config: dict) -> None:
        *parents, leaf = path.split(".")
        target = config
        for key in parents:
            target = target[key]
        if value is None:
            del target[leaf]
        else:
            target[leaf] = value

    return change


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (_set("text_config.rope_scaling.rope_type", "yarn"), "rope_type 'yarn'"),
        (_set("text_config.rope_scaling", {"type": "dynamic", "factor": 2.0}), "rope_type 'dynamic'"),
        (_set("text_config.rope_scaling.mrope_interleaved", False), "mrope_interleaved"),
        (_set("text_config.attention_dropout", 0.1), "attention_dropout"),
        (_set("text_config.hidden_act", "swish"), "hidden_act 'swish'"),
        (_set("text_config.hidden_size", None), "hidden_size"),
        (_set("vision_config.rope_parameters", {"rope_type": "default"}), "vision_config.rope_type"),
        (_set("vision_config.num_position_embeddings", 60), "num_position_embeddings 60"),
        (_set("vision_config.patch_size", [8, 4]), "patch_size"),
        (_set("text_config", None), "text_config"),
    ],
)
def test_unsupported_config_values_are_refused_in_one_line(tiny_folder, tmp_path, change, needle):
    config = copy.deepcopy(json.loads((tiny_folder / "config.json").read_text()))
    change(config)
    folder = _copy(tiny_folder, tmp_path, config=config)
    with pytest.raises(CheckpointError) as caught:
        load_text_encoder(folder, torch.device("cpu"), torch.float32)
    message = str(caught.value)
    assert str(folder / "config.json") in message and needle in message and "\n" not in message


def test_a_position_table_of_the_wrong_size_is_refused(tiny_folder, tmp_path):
    config = json.loads((tiny_folder / "config.json").read_text())
    config["vision_config"]["num_position_embeddings"] = 49  # square, but the file holds 64 rows
    folder = _copy(tiny_folder, tmp_path, config=config)
    with pytest.raises(CheckpointError, match=r"wrong shape for model\.visual\.pos_embed\.weight"):
        load_text_encoder(folder, torch.device("cpu"), torch.float32)


def test_loading_and_running_the_encoder_imports_no_transformers(tiny_folder):
    code = f"""
import sys
from pathlib import Path
import torch
from compactedit_cli.loading.checkpoint import load_text_encoder
encoder = load_text_encoder(Path({str(tiny_folder)!r}), torch.device("cpu"), torch.float32)
grid = torch.tensor([[1, 4, 4]])
tokens, deepstack = encoder.image_features(torch.randn(16, 384), grid)
embeds = torch.cat([encoder.embed_tokens(torch.tensor([[1, 2, 3]])), tokens[None]], dim=1)
types = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
mask = torch.ones_like(types, dtype=torch.bool)
visual = types.bool()
states = encoder(embeds, mask, encoder.rope_index(types, grid, mask), visual, deepstack)
assert states.shape == (1, 7, 64) and torch.isfinite(states).all()
print(sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "diffusers", "peft")))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
