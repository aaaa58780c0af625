"""The two flow-matching schedulers a VIBE checkpoint may name, computed as diffusers computes them.

``DPMSolverMultistepScheduler`` in its flow configuration (the Sana family's: ``prediction_type: flow_prediction``,
``use_flow_sigmas: true``, DPM-Solver++ of order 1 or 2) and ``FlowMatchEulerDiscreteScheduler`` with a static
shift. The schedules are computed in the same precision and order of operations as diffusers' (its NumPy float64
grids become torch float64 ones with the same arithmetic), so timesteps match exactly and steps to rounding.

Config values that change the maths and are not implemented here are refused (ValueError naming the field; the
loader names the file). Fields that diffusers itself reads only in a configuration refused here (the beta schedule,
timestep spacing and offsets, thresholding bounds, dynamic-shift bounds) are accepted and unused, as there.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

SCHEDULER_CLASSES = ("DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler")


def _linspace(start: float, stop: float, num: int) -> torch.Tensor:
    """NumPy's ``linspace`` in float64: ``arange * step + start``, the last point exactly ``stop``."""
    values = torch.arange(num, dtype=torch.float64)
    if num > 1:
        values = values * ((stop - start) / (num - 1)) + start
        values[-1] = stop
    else:
        values = values + start
    return values


def _settings(defaults: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with the known fields of ``config`` (unknown ones, e.g. ``_class_name``, are ignored)."""
    return {**defaults, **{key: value for key, value in config.items() if key in defaults}}


def _refuse(settings: dict[str, Any], wanted: dict[str, tuple[Any, ...]], cls: str) -> None:
    for key, allowed in wanted.items():
        if settings[key] not in allowed:
            accepted = " or ".join(repr(a) for a in allowed)
            raise ValueError(f"{cls}: {key} {settings[key]!r} is not implemented (only {accepted})")


class FlowScheduler:
    """What the denoise loop uses: :meth:`set_timesteps`, then one :meth:`step` per entry of :attr:`timesteps`.

    :attr:`sigmas` has one more entry than :attr:`timesteps` (the final 0), as diffusers'; :attr:`config` is the
    full settings dict (defaults filled in).
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {}
    REQUIRED: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = _settings(self.DEFAULTS, config or {})
        _refuse(self.config, self.REQUIRED, type(self).__name__)
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self.step_index = 0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        raise NotImplementedError

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DPMSolverMultistepScheduler(FlowScheduler):
    """Multistep DPM-Solver++ on flow sigmas ``shift·s / (1 + (shift−1)·s)``, predicting velocity."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    REQUIRED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "prediction_type": ("flow_prediction",),
        "use_flow_sigmas": (True,),
        "algorithm_type": ("dpmsolver++",),
        "solver_order": (1, 2),
        "solver_type": ("midpoint", "heun"),
        "thresholding": (False,),
        "use_karras_sigmas": (False,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_lu_lambdas": (False,),
        "final_sigmas_type": ("zero",),
        "use_dynamic_shifting": (False,),
    }

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self._outputs: list[torch.Tensor] = []

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``num_inference_steps`` integer timesteps on ``device``; the float32 sigmas stay on the CPU, as
        diffusers keeps them (scalars for the update, read without a device sync)."""
        train = self.config["num_train_timesteps"]
        shift = self.config["flow_shift"]
        sigmas = 1.0 - _linspace(1, 1 / train, num_inference_steps + 1)
        sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).flip(0)[:-1]
        self.timesteps = (sigmas * train).to(torch.int64).to(device)
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)
        self.step_index = 0
        self._outputs = []

    @staticmethod
    def _lambda(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, log-SNR) of a flow sigma: alpha = 1 − sigma, lambda = log(alpha) − log(sigma)."""
        alpha = 1 - sigma
        return alpha, torch.log(alpha) - torch.log(sigma)

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The sample at the next sigma, in the float32 arithmetic of diffusers' step (returned in the data
        prediction's dtype)."""
        index = self.step_index
        # The first step has no earlier prediction; the last (to sigma 0) is first order whatever
        # lower_order_final and euler_at_final say, as diffusers makes it with final_sigmas_type zero.
        first_order = self.config["solver_order"] == 1 or index == 0 or index == len(self.timesteps) - 1
        sigma_s0 = self.sigmas[index]
        data = sample - sigma_s0 * model_output  # the data (x0) prediction of a velocity
        self._outputs = [*self._outputs[-1:], data]
        sample = sample.to(torch.float32)
        sigma_t = self.sigmas[index + 1]
        alpha_t, lambda_t = self._lambda(sigma_t)
        _, lambda_s0 = self._lambda(sigma_s0)
        h = lambda_t - lambda_s0
        decay = alpha_t * (torch.exp(-h) - 1.0)
        if first_order:
            out = (sigma_t / sigma_s0) * sample - decay * data
        else:
            _, lambda_s1 = self._lambda(self.sigmas[index - 1])
            r0 = (lambda_s0 - lambda_s1) / h
            d1 = (1.0 / r0) * (data - self._outputs[0])
            if self.config["solver_type"] == "midpoint":
                out = (sigma_t / sigma_s0) * sample - decay * data - 0.5 * decay * d1
            else:
                out = (sigma_t / sigma_s0) * sample - decay * data + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
        self.step_index += 1
        return out.to(data.dtype)


class FlowMatchEulerDiscreteScheduler(FlowScheduler):
    """Euler steps of a velocity over linearly spaced, statically shifted sigmas."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    }
    REQUIRED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "use_dynamic_shifting": (False,),
        "invert_sigmas": (False,),
        "shift_terminal": (None,),
        "use_karras_sigmas": (False,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "stochastic_sampling": (False,),
    }

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        train, shift = self.config["num_train_timesteps"], self.config["shift"]
        # The training grid's ends, in float32 as diffusers computes them once at construction.
        grid = torch.arange(train, 0, -1, dtype=torch.float32) / train
        grid = shift * grid / (1 + (shift - 1) * grid)
        self._sigma_max, self._sigma_min = grid[0].item(), grid[-1].item()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Float32 timesteps and sigmas on ``device``."""
        train, shift = self.config["num_train_timesteps"], self.config["shift"]
        sigmas = _linspace(self._sigma_max * train, self._sigma_min * train, num_inference_steps) / train
        sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).to(device=device, dtype=torch.float32)
        self.timesteps = sigmas * train
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        self.step_index = 0

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        index = self.step_index
        out = sample.to(torch.float32) + (self.sigmas[index + 1] - self.sigmas[index]) * model_output
        self.step_index += 1
        return out.to(model_output.dtype)


Scheduler = DPMSolverMultistepScheduler | FlowMatchEulerDiscreteScheduler


def scheduler_from_config(class_name: str, config: dict[str, Any]) -> Scheduler:
    """The scheduler ``class_name`` (as model_index.json names it) for a ``scheduler_config.json``."""
    classes = {cls.__name__: cls for cls in (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler)}
    if class_name not in classes:
        raise ValueError(f"scheduler {class_name!r} is not supported (one of {', '.join(SCHEDULER_CLASSES)})")
    return classes[class_name](config)
