"""Run a vidmoe command with a stochastic Euler sampler that draws only part of its noise fresh.

diffusers' FlowMatchEulerDiscreteScheduler with stochastic_sampling (vidmoe's `euler-stochastic`) moves
from t to the next level t' by predicting the clean clip x0 and noising it again with all-new noise:
x' = (1 - t') x0 + t' z. Plain Euler keeps the noise the model sees in x, eps = x + (1 - t) v. This
script patches the scheduler's step to mix the two, x' = (1 - t') x0 + t' (sqrt(1 - eta^2) eps + eta z),
so eta = 1 is `euler-stochastic` and eta = 0 plain Euler; then it runs the vidmoe command line:

    python scripts/partial_noise_eval.py 0.8 eval --model samples/bouncing-moe --out OUT --no-fvd --seed 4

Session 37 tried eta 0.5, 0.8 and 0.95 on the shipped model (scripts/results.sh retune): all worse or
level, so the package keeps the plain stochastic step.
"""

from __future__ import annotations

import math
import sys

import diffusers
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from vidmoe.cli import main


def patch_scheduler(eta: float) -> None:
    """Replace the stochastic branch of FlowMatchEulerDiscreteScheduler.step by the eta mix above."""
    if not 0.0 <= eta <= 1.0:
        raise SystemExit(f"eta must be in [0, 1], got {eta:g}")
    plain_step = diffusers.FlowMatchEulerDiscreteScheduler.step

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, **kwargs):
        if not self.config.stochastic_sampling:
            return plain_step(self, model_output, timestep, sample, generator=generator,
                              return_dict=return_dict, **kwargs)
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.float()
        t, t_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        x0 = sample - t * model_output
        eps = sample + (1 - t) * model_output
        fresh = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev = (1 - t_next) * x0 + t_next * (math.sqrt(1 - eta ** 2) * eps + eta * fresh)
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    diffusers.FlowMatchEulerDiscreteScheduler.step = step


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    patch_scheduler(float(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
