"""The training objective: rectified-flow matching on DC-AE latents, posed exactly as VIBE's edits are run.

Each choice and where it comes from:

* **Flow matching, velocity target.** ``x_t = (1 - σ) x_0 + σ ε`` and the DiT predicts ``ε - x_0``: the
  scheduler's ``prediction_type: flow_prediction`` (vibe-reference.md §1.5) and diffusers'
  ``train_dreambooth_lora_sana.py`` ("Add noise according to flow matching", ``target = noise - model_input``).
* **Timesteps.** ``u`` is drawn logit-normal (mean 0, std 1), Sana's training default (its configs'
  ``weighting_scheme: logit_normal``; diffusers' ``compute_density_for_timestep_sampling``), and shifted with the
  checkpoint's own ``flow_shift`` by the same map the inference scheduler uses for its flow sigmas,
  ``σ = s·u / (1 + (s - 1)·u)`` (§1.5), so training sees the noise levels inference visits. The DiT gets
  ``σ · num_train_timesteps · timestep_scale``, as the denoise loop passes ``t · timestep_scale``.
* **Source on channels.** The source latents are concatenated after the noisy latents, the ``channel_cat`` input
  of VIBE's transformer (§0.1 point 3).
* **Conditioning.** Qwen3-VL's meta-query states through the edit head (the ``cond`` context), computed once per
  pair by the trainer; the VLM and the edit head stay frozen.
* **Condition dropout for 3-way guidance.** With probability ``p`` each: text dropped only, both dropped, image
  dropped only (InstructPix2Pix §3.3; diffusers' ``train_instruct_pix2pix.py`` ``--conditioning_dropout_prob``).
  Text is dropped to the ``null`` context (the edit head on zeroed VLM states, §0.1 point 7) and the image to zero
  latents, the two unconditional inputs the guided loop feeds (guidance.py), so an adapter keeps all three branches.
* **Loss.** Unweighted mean squared error in float32 (the Sana script's default ``weighting_scheme: none`` after
  sampling, since the logit-normal draw already weights the timesteps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_COND_DROPOUT = 0.05  # InstructPix2Pix's 5% for each of the three dropped cases
LOGIT_MEAN = 0.0
LOGIT_STD = 1.0


@dataclass(frozen=True)
class FlowObjective:
    """The scheduler facts training needs, read from the checkpoint's scheduler config."""

    flow_shift: float
    num_train_timesteps: int
    timestep_scale: float = 1.0
    cond_dropout: float = DEFAULT_COND_DROPOUT

    @classmethod
    def from_scheduler(cls, config, timestep_scale: float, cond_dropout: float) -> FlowObjective:
        """DPM-Solver's ``flow_shift`` or flow-Euler's ``shift`` (the two scheduler classes a checkpoint may name)."""
        shift = config.get("flow_shift") if config.get("use_flow_sigmas", True) else None
        shift = shift if shift is not None else config.get("shift", 1.0)
        return cls(float(shift), int(config.get("num_train_timesteps", 1000)), float(timestep_scale), cond_dropout)

    def sigmas(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.sigmoid(LOGIT_MEAN + LOGIT_STD * torch.randn(batch, generator=generator))
        return self.flow_shift * u / (1 + (self.flow_shift - 1) * u)

    def dropout(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(text dropped, image dropped) masks: [0, p) text, [p, 2p) both, [2p, 3p) image."""
        draw = torch.rand(batch, generator=generator)
        p = self.cond_dropout
        return draw < 2 * p, (draw >= p) & (draw < 3 * p)

    def inputs(
        self,
        target: torch.Tensor,
        source: torch.Tensor,
        cond: torch.Tensor,
        null: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(model input, context, model timestep, velocity target) for a batch of float32 CPU latents."""
        batch = target.shape[0]
        noise = torch.randn(target.shape, generator=generator)
        sigma = self.sigmas(batch, generator)
        drop_text, drop_image = self.dropout(batch, generator)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * target + s * noise
        source = torch.where(drop_image.view(-1, 1, 1, 1), torch.zeros_like(source), source)
        context = torch.where(drop_text.view(-1, 1, 1), null, cond)
        timestep = sigma * self.num_train_timesteps * self.timestep_scale
        return torch.cat([noisy, source], dim=1), context, timestep, noise - target
