"""Conditioning: (image, instructions) -> the DiT's cross-attention context, through Qwen3-VL.

The flow, as in the reference pipeline:

1. Each instruction is wrapped in the edit template and one user turn (image first, then text) and rendered with
   the checkpoint's chat template; the processor resizes the image to the VLM pixel budget.
2. Token embeddings get the vision features scattered into the ``<|image_pad|>`` slots.
3. The N learned meta queries are inserted right after each row's valid tokens (right padding), counted as text.
4. M-RoPE positions are computed for the extended sequence, so the queries continue the text positions.
5. One causal pass of the language model, with the DeepStack features added after its first layers.
6. The final-norm hidden states at the N meta positions go through the edit head: that is the ``cond`` context.
   The ``null`` context is the edit head applied to zero states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .. import options
from ..errors import UsageError
from .processor import IMAGE_TOKEN, VIDEO_TOKEN, ImageTextProcessor, TextTokenizer

EDIT_TEMPLATE = "what will this image be like if {instruction}"

# Instruction tokens the VLM reads; longer text is cut on a token boundary, with a warning. Edit instructions are a
# sentence or two (tens of tokens), so this leaves ample room; it caps the prompt (and the VLM's time and memory)
# when a runaway input such as a pasted document arrives instead.
MAX_INSTRUCTION_TOKENS = 256

# The reference's VLM pixel budget (352² to 672²): 121 to 441 image tokens with Qwen3-VL-2B.
VLM_MIN_PIXELS = 352 * 352
VLM_MAX_PIXELS = 672 * 672


@dataclass
class VLMBatch:
    """The processor's output for one image and B instructions (right-padded)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor


@dataclass
class MetaInputs:
    """The language-model inputs once the meta queries are in place."""

    inputs_embeds: torch.Tensor  # (B, L + N, D)
    attention_mask: torch.Tensor  # (B, L + N) bool
    position_ids: torch.Tensor  # (3, B, L + N)
    visual_pos_masks: torch.Tensor  # (B, L + N) bool
    deepstack_embeds: list[torch.Tensor]
    valid_lengths: list[int]  # valid prompt tokens per row, before the queries


@dataclass
class Conditioning:
    """The cross-attention contexts for B instructions, and the VLM states they came from."""

    cond: torch.Tensor  # (B, N, caption_channels)
    null: torch.Tensor  # (B, N, caption_channels)
    meta_states: torch.Tensor  # (B, N, VLM hidden)
    meta_inputs: MetaInputs


def fit_instruction(
    tokenizer: TextTokenizer, instruction: str, limit: int = MAX_INSTRUCTION_TOKENS
) -> tuple[str, str | None]:
    """The instruction cut to ``limit`` tokens before the first token that does not fit, and a warning if cut.

    Cutting at the start of the first dropped token never splits a character, even one spread over several
    byte-level tokens (emoji, CJK), and the cut text never tokenizes longer than ``limit``.
    """
    text = options.instruction(instruction)
    offsets = tokenizer.offsets(text)
    if len(offsets) <= limit:
        return text, None
    cut = text[: offsets[limit][0]].rstrip()
    return cut, f"the instruction is {len(offsets)} tokens long; only the first {limit} are used"


def render_prompts(processor: ImageTextProcessor, instructions: Sequence[str]) -> list[str]:
    """The chat texts the VLM reads, one per instruction.

    The image placeholders are the processor's to expand, so an instruction that writes one is refused.
    """
    texts = []
    for instruction in instructions:
        for token in (IMAGE_TOKEN, VIDEO_TOKEN):
            if token in instruction:
                raise UsageError(f"the instruction contains {token}, a token reserved for the image")
        content = [
            {"type": "image", "image": None},
            {"type": "text", "text": EDIT_TEMPLATE.format(instruction=instruction.strip())},
        ]
        message = [{"role": "user", "content": content}]
        texts.append(processor.render_chat(message))
    return texts


class VLMConditioner:
    """Runs Qwen3-VL over (image, instructions) and the edit head over its meta-token states."""

    def __init__(
        self, processor, text_encoder, transformer, min_pixels: int = VLM_MIN_PIXELS, max_pixels: int = VLM_MAX_PIXELS
    ) -> None:
        self.processor = processor
        self.text_encoder = text_encoder
        self.transformer = transformer
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    def fit_instruction(self, instruction: str) -> tuple[str, str | None]:
        """See :func:`fit_instruction`, with this model's tokenizer."""
        return fit_instruction(self.processor.tokenizer, instruction)

    def prepare(self, images: Sequence[Image.Image], instructions: Sequence[str]) -> VLMBatch:
        """Tokenise the prompts and patchify each row's image (one copy per row, as the reference does)."""
        texts = render_prompts(self.processor, instructions)
        return VLMBatch(**self.processor(texts, images, min_pixels=self.min_pixels, max_pixels=self.max_pixels))

    def meta_inputs(self, batch: VLMBatch) -> MetaInputs:
        """Embed the prompt, scatter in the vision features and insert the meta queries after the valid tokens."""
        vlm = self.text_encoder
        device = self.device
        input_ids = batch.input_ids.to(device)
        mask = batch.attention_mask.to(device).bool()
        grid = batch.image_grid_thw.to(device)

        embeds = vlm.embed_tokens(input_ids)
        image_embeds, deepstack = vlm.image_features(batch.pixel_values.to(device), grid)
        image_mask = input_ids == vlm.config.image_token_id
        embeds = embeds.masked_scatter(image_mask[..., None], image_embeds.to(embeds.dtype))

        queries = self.transformer.meta_queries.to(device=device, dtype=embeds.dtype)
        num_queries = queries.shape[0]
        valid_lengths = mask.sum(dim=1).tolist()

        def insert(row: torch.Tensor, valid: int, filler: torch.Tensor) -> torch.Tensor:
            return torch.cat([row[:valid], filler, row[valid:]])

        ones = torch.ones(num_queries, dtype=torch.bool, device=device)
        zeros_bool = torch.zeros_like(ones)
        zeros_type = torch.zeros(num_queries, dtype=batch.mm_token_type_ids.dtype, device=device)
        rows = list(zip(valid_lengths, embeds, mask, image_mask, batch.mm_token_type_ids.to(device), strict=True))
        new_embeds = torch.stack([insert(e, n, queries) for n, e, _, _, _ in rows])
        new_mask = torch.stack([insert(m, n, ones) for n, _, m, _, _ in rows])
        new_visual = torch.stack([insert(v, n, zeros_bool) for n, _, _, v, _ in rows])
        new_types = torch.stack([insert(t, n, zeros_type) for n, _, _, _, t in rows])

        # The queries count as text, so their positions continue the prompt's.
        position_ids = vlm.rope_index(new_types, grid, new_mask)
        return MetaInputs(new_embeds, new_mask, position_ids, new_visual, deepstack, valid_lengths)

    def meta_states(self, inputs: MetaInputs) -> torch.Tensor:
        """Final-norm hidden states of the language model at each row's N meta positions."""
        hidden = self.text_encoder(
            inputs.inputs_embeds,
            inputs.attention_mask,
            inputs.position_ids,
            inputs.visual_pos_masks,
            inputs.deepstack_embeds,
        )
        num_queries = self.transformer.meta_queries.shape[0]
        return torch.stack([row[n : n + num_queries] for row, n in zip(hidden, inputs.valid_lengths, strict=True)])

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image], instructions: Sequence[str]) -> Conditioning:
        """The (cond, null) contexts for B rows of (RGB image, instruction)."""
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images for {len(instructions)} instructions")
        meta_inputs = self.meta_inputs(self.prepare(images, instructions))
        states = self.meta_states(meta_inputs)
        cond, null = self.transformer.edit_context(states)
        return Conditioning(cond=cond, null=null, meta_states=states, meta_inputs=meta_inputs)
