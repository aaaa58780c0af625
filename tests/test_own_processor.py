"""Our Qwen3-VL processor against transformers' (the independent reference), on real tokenizer folders.

The reference is what the engine used before: ``Qwen3VLProcessor`` over ``AutoTokenizer`` and the Qwen2-VL PIL
image processor with torch's uint8 bicubic resize (the published checkpoint's 4.57 fast path). Ids, masks, token
types and grids must be identical, and the pixel values bit-identical.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compactedit_cli.engine.conditioning import MAX_INSTRUCTION_TOKENS, fit_instruction, render_prompts
from compactedit_cli.engine.processor import load_processor
from compactedit_cli.errors import CheckpointError, InputImageError, UsageError
from compactedit_cli.random_weights.tiny import TinySpec, write_tokenizer

# The fields the engine took from the saved image-processor config before (plus those the variants exercise).
_REFERENCE_FIELDS = (
    "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "size", "min_pixels",
    "max_pixels", "rescale_factor",
)  # fmt: skip

LONG = "make the sky a deep blue and " * 60  # well past the 256-token cut

INSTRUCTIONS = [
    ["make the sky blue"],
    ["add a red hat 🎩 to the cat 🐱‍👤, then 🌈!", "把天空变成蓝色，加一只猫"],
    ["Ünïcödé  spaces\u00a0and 'quotes' it's they'll", "x", "numbers 12345 and <tags> & done"],
    ["keep <|im_end|> as a token", LONG[:900]],
]


def reference_processor(folder: Path):
    """transformers' processor for a tokenizer folder, built as the engine built it before."""
    from transformers import AutoTokenizer, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
    from transformers.processing_utils import ProcessorMixin

    class TorchResize(Qwen2VLImageProcessorPil):
        def resize(self, image, size, resample, factor, **kwargs):
            height, width = image.shape[-2:]
            target = smart_resize(height, width, factor, min_pixels=size.shortest_edge, max_pixels=size.longest_edge)
            if target == (height, width):
                return image
            pixels = torch.from_numpy(np.ascontiguousarray(image, dtype=np.uint8))[None]
            out = torch.nn.functional.interpolate(pixels, size=target, mode="bicubic", align_corners=False,
                                                  antialias=True)  # fmt: skip
            return out[0].numpy()

    class Reference(Qwen3VLProcessor):
        def __init__(self, image_processor, tokenizer, chat_template):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    if (folder / "preprocessor_config.json").is_file():
        config = json.loads((folder / "preprocessor_config.json").read_text())
    else:
        config = json.loads((folder / "processor_config.json").read_text())["image_processor"]
    image_processor = TorchResize(**{k: config[k] for k in _REFERENCE_FIELDS if config.get(k) is not None})
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "right"
    return Reference(image_processor, tokenizer, (folder / "chat_template.jinja").read_text())


def _turn(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": None}, {"type": "text", "text": text}]}]


def _image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The tokenizer folders: 4.57 files, 5.x files, vocab/merges only, and the official pipeline's."""
    root = tmp_path_factory.mktemp("tokenizers")
    legacy, current, merges = root / "legacy", root / "current", root / "merges"
    write_tokenizer(legacy, TinySpec(legacy_processor=True))
    write_tokenizer(current, TinySpec(legacy_processor=False))
    shutil.copytree(legacy, merges)
    (merges / "tokenizer.json").unlink()
    found = {"legacy": legacy, "current": current, "merges": merges}
    parity = Path(__file__).resolve().parents[1].parent / "shared" / "parity" / "checkpoint" / "tokenizer"
    if parity.is_dir():
        found["parity"] = parity
    return found


@pytest.mark.parametrize("layout", ["legacy", "current", "merges", "parity"])
def test_inputs_equal_transformers(folders, layout):
    if layout not in folders:
        pytest.skip("the parity fixtures live beside the project, not in the repo")
    ours, reference = load_processor(folders[layout]), reference_processor(folders[layout])
    sizes = [(90, 60), (60, 90), (1024, 1024), (17, 300), (33, 33), (640, 161)]
    modes = ["RGB", "RGBA", "L", "RGB"]
    for index, instructions in enumerate(INSTRUCTIONS):
        for size in sizes[index : index + 2]:
            image = _image(*size, mode=modes[index], seed=index)
            texts = render_prompts(ours, instructions)
            expected_texts = [
                reference.apply_chat_template(_turn(f"what will this image be like if {t.strip()}"), tokenize=False)
                for t in instructions
            ]
            assert texts == expected_texts
            got = ours(texts, [image] * len(texts), min_pixels=1024, max_pixels=4096)
            want = reference(text=texts, images=[image] * len(texts), padding=True, return_tensors="pt",
                             size={"shortest_edge": 1024, "longest_edge": 4096})  # fmt: skip
            for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "pixel_values"):
                assert got[key].dtype == want[key].dtype, key
                assert torch.equal(got[key], want[key]), (layout, size, key)
            assert got["mm_token_type_ids"].sum() == (got["input_ids"] == ours.image_token_id).sum() > 0


@pytest.mark.parametrize("layout", ["legacy", "merges"])
def test_offsets_and_the_instruction_cut_equal_transformers(folders, layout):
    ours, reference = load_processor(folders[layout]), reference_processor(folders[layout])
    for text in (LONG, "🎩" * 300, "把天空变成蓝色" * 80, "ab " * 255 + "🐱‍👤 tail", "short"):
        want = reference.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert ours.tokenizer.offsets(text) == want
        cut, warning = fit_instruction(ours.tokenizer, text)
        assert (warning is None) == (len(want) <= MAX_INSTRUCTION_TOKENS)
        assert cut == (text.strip() if warning is None else text[: want[MAX_INSTRUCTION_TOKENS][0]].rstrip())
        assert len(ours.tokenizer.offsets(cut)) <= MAX_INSTRUCTION_TOKENS


def _with_image_config(folder: Path, target: Path, **changes) -> Path:
    shutil.copytree(folder, target)
    path = target / "processor_config.json"
    document = json.loads(path.read_text())
    document["image_processor"].update(changes)
    path.write_text(json.dumps(document))
    return target


def test_image_config_fields_equal_transformers(folders, tmp_path):
    """min/max_pixels override size; mean, std and rescale factor reach the maths; no call-time size."""
    folder = _with_image_config(
        folders["current"], tmp_path / "variant", min_pixels=2048, max_pixels=8192, merge_size=1,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        rescale_factor=1 / 256, temporal_patch_size=1,
    )  # fmt: skip
    ours, reference = load_processor(folder), reference_processor(folder)
    for size in ((300, 200), (20, 20)):
        image = _image(*size, seed=7)
        texts = render_prompts(ours, ["make it red", "two"])
        got = ours(texts, [image, image])
        want = reference(text=texts, images=[image, image], padding=True, return_tensors="pt")
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "pixel_values"):
            assert torch.equal(got[key], want[key]), (size, key)


# A Qwen3-VL-style template: whitespace control, attribute access on dicts, namespaces, tojson, loop controls,
# the {% generation %} tag, raise_exception and the special tokens as variables.
_RICH_TEMPLATE = """
{%- set ns = namespace(images=0) -%}
{%- if messages[0].role == 'system' %}{{ raise_exception('no system turn') }}{% endif %}
{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\n' }}
    {%- for content in message.content %}
        {%- if content.type == 'image' or 'image' in content %}
            {%- set ns.images = ns.images + 1 %}
            {%- if add_vision_id %}Picture {{ ns.images }}: {% endif -%}
            <|vision_start|><|image_pad|><|vision_end|>
        {%- elif 'text' in content %}
            {{- content.text | tojson }}
            {%- if loop.last %}{% break %}{% endif %}
        {%- endif %}
    {%- endfor %}
    {%- generation %}{{ eos_token }}{% endgeneration %}
{% endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}
"""


def test_template_features_render_as_transformers(folders, tmp_path):
    folder = tmp_path / "template"
    shutil.copytree(folders["current"], folder)
    (folder / "chat_template.jinja").write_text(_RICH_TEMPLATE)
    ours, reference = load_processor(folder), reference_processor(folder)
    for instruction in ('a "quoted" <b>bold</b> & café 🎩', "把天空变成蓝色"):
        message = _turn(f"what will this image be like if {instruction}")
        rendered = ours.render_chat(message)
        assert rendered == reference.apply_chat_template(message, tokenize=False)
        assert rendered.startswith("<|im_start|>user\n<|vision_start|>") and rendered.endswith("<|im_end|>")
        assert json.dumps(instruction, ensure_ascii=False)[1:] in rendered  # tojson keeps non-ASCII and HTML
        assert render_prompts(ours, [instruction]) == [rendered]
        generation = ours.render_chat(message, add_generation_prompt=True)
        assert generation == reference.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    with pytest.raises(CheckpointError, match="no system turn"):
        ours.render_chat([{"role": "system", "content": []}])


def test_every_template_file_layout_loads(folders, tmp_path):
    """chat_template.jinja (5.x), chat_template.json (4.57) and tokenizer_config's (older) render alike."""
    source = (folders["legacy"] / "chat_template.jinja").read_text()
    expected = render_prompts(load_processor(folders["legacy"]), ["make it blue"])
    for layout in ("json", "config", "named"):
        folder = tmp_path / layout
        shutil.copytree(folders["legacy"], folder)
        (folder / "chat_template.jinja").unlink()
        if layout == "json":
            (folder / "chat_template.json").write_text(json.dumps({"chat_template": source}))
        else:
            config = json.loads((folder / "tokenizer_config.json").read_text())
            named = [{"name": "tool_use", "template": "{{ raise_exception('wrong one') }}"},
                     {"name": "default", "template": source}]  # fmt: skip
            config["chat_template"] = source if layout == "config" else named
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
        assert render_prompts(load_processor(folder), ["make it blue"]) == expected
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": None}))
    with pytest.raises(CheckpointError, match="has no chat template"):
        load_processor(folder)
    (folder / "chat_template.jinja").write_bytes(b"\xff\xfe{{ bad }}")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_processor(folder)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ ''.__class__.__mro__ }}", "the chat template failed"),
        ("{{ cycler.__init__.__globals__ }}", "the chat template failed"),
        ("{% for m in messages %}", "does not compile"),
    ],
)
def test_checkpoint_templates_stay_in_the_sandbox(folders, tmp_path, template, message):
    folder = tmp_path / "hostile"
    shutil.copytree(folders["current"], folder)
    (folder / "chat_template.jinja").write_text(template)
    with pytest.raises(CheckpointError, match=message) as caught:
        render_prompts(load_processor(folder), ["make it blue"])
    assert str(folder / "chat_template.jinja") in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("do_normalize", False, "do_normalize=false"), ("resample", 2, "resample=2"), ("image_mean", [0.5], "3 values")],
)
def test_unsupported_image_config_values_are_refused(folders, tmp_path, field, value, words):
    folder = _with_image_config(folders["current"], tmp_path / "bad", **{field: value})
    with pytest.raises(CheckpointError, match=words) as caught:
        load_processor(folder)
    assert str(folder / "processor_config.json") in str(caught.value)


def test_broken_tokenizer_folders_are_checkpoint_errors(folders, tmp_path):
    shifted = tmp_path / "shifted"
    shutil.copytree(folders["merges"], shifted)
    config = json.loads((shifted / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(int(k) + 1): v for k, v in config["added_tokens_decoder"].items()}
    (shifted / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="should have id 301"):
        load_processor(shifted)
    config["added_tokens_decoder"] = {"300": {"special": True}}
    (shifted / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="added_tokens_decoder is malformed"):
        load_processor(shifted)
    config = json.loads((folders["merges"] / "tokenizer_config.json").read_text())
    (shifted / "tokenizer_config.json").write_text(json.dumps({**config, "split_special_tokens": True}))
    with pytest.raises(CheckpointError, match="split_special_tokens=true is not supported"):
        load_processor(shifted)
    empty = tmp_path / "empty"
    shutil.copytree(folders["merges"], empty)
    (empty / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match=r"has no tokenizer\.json"):
        load_processor(empty)
    (empty / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load the tokenizer"):
        load_processor(empty)


def test_reserved_tokens_and_thin_images_are_user_errors(folders):
    processor = load_processor(folders["legacy"])
    with pytest.raises(UsageError, match="reserved"):
        render_prompts(processor, ["paint <|image_pad|> here"])
    texts = render_prompts(processor, ["make it blue"])
    with pytest.raises(InputImageError, match="200:1"):
        processor(texts, [_image(402, 2)], min_pixels=1024, max_pixels=4096)


def test_the_processor_imports_no_transformers(folders):
    """Loading the processor and preparing a batch in a fresh process leaves transformers unimported."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from PIL import Image\n"
        "from compactedit_cli.engine.conditioning import VLMBatch, render_prompts\n"
        "from compactedit_cli.engine.processor import load_processor\n"
        f"processor = load_processor(Path({str(folders['legacy'])!r}))\n"
        "texts = render_prompts(processor, ['make it blue', 'add a hat'])\n"
        "batch = VLMBatch(**processor(texts, [Image.new('RGB', (90, 60))] * 2, min_pixels=1024, max_pixels=4096))\n"
        "assert batch.input_ids.shape[0] == 2\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'diffusers', 'peft')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
