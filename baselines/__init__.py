"""Baseline guidances on the msd Guidance protocol; importing registers "sds", "vsd" and "sdi"."""
from baselines.sdi import SDIGuidance
from baselines.sds import SDSGuidance
from baselines.vsd import ResidualDenoiser, VSDGuidance

__all__ = ["ResidualDenoiser", "SDIGuidance", "SDSGuidance", "VSDGuidance"]
