"""Mean-shift distillation core: schedules, denoisers, solvers, the Guidance protocol and MSD itself."""
from msd.bandwidth import BandwidthSchedule
from msd.denoiser import Denoiser, GuidedDenoiser
from msd.guidance import Guidance, GuidanceOutput, available_guidances, build_guidance, register, target_loss
from msd.mean_shift import MSDGuidance
from msd.schedules import EDMSchedule, TimestepSampler, VPSchedule, distillation_weight
from msd.solvers import ddim_invert, sample, solver_step

__all__ = [
    "BandwidthSchedule", "Denoiser", "EDMSchedule", "Guidance", "GuidanceOutput", "GuidedDenoiser",
    "MSDGuidance", "TimestepSampler", "VPSchedule", "available_guidances", "build_guidance",
    "ddim_invert", "distillation_weight", "register", "sample", "solver_step", "target_loss",
]
