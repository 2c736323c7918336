"""The Task protocol and the task registry (``task.name`` in the config → a :class:`Task` class).

A task owns what differs between experiments — its parameters ψ and how they render the samples x a guidance
sees, the conditioning of each step, its metrics and its output files — and hands the optimisation to the one
loop, :func:`experiments.distill.distill`. A task class registers itself with ``@register_task("name")``; the
built-in tasks are imported on first use (the toy does not pay for diffusers, transformers or torchmetrics).
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from omegaconf import DictConfig
from torch import Tensor

from experiments.checkpoint import RunCheckpoint
from experiments.loggers import RunLogger
from msd.checks import require
from msd.denoiser import Conditioning


@dataclass(frozen=True)
class Penalty:
    """A task's regularisation of one step: ``total`` = Σ_k λ_k L_k (differentiable, added to the target loss) and
    the weighted terms λ_k L_k by name (logged as ``reg_<name>``, with ``regularisation`` = total)."""

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        return {"regularisation": self.total.item(), **{f"reg_{k}": v.item() for k, v in self.terms.items()}}


class Task(ABC):
    """One experiment's world: built from the config (every check before anything is written), then run.

    The loop calls :meth:`render`, :meth:`conditioning`, :meth:`regularisation`, :meth:`after_step`, :meth:`evaluate` and, for a
    checkpoint, :meth:`state_dict` / :meth:`load_state_dict`; :meth:`run` drives a whole run and writes the
    outputs."""

    name: ClassVar[str] = ""
    objective: ClassVar[str] = ""
    """The final metric a Hydra sweep over this task optimises."""
    step_column: ClassVar[str] = "step"
    """The step's column in metrics.csv."""
    evals_column: ClassVar[str | None] = None
    """The column of cumulative network evaluations per sample in metrics.csv (None: only in final.json)."""

    @classmethod
    @abstractmethod
    def build(cls, cfg: DictConfig) -> Task:
        """Check ``cfg`` and build the run's objects; raises ``ValueError`` naming a bad field."""

    @abstractmethod
    def render(self) -> Tensor:
        """The samples x [N, ...] the guidance sees, differentiable in the optimised parameters."""

    def conditioning(self, step: int) -> Conditioning | None:
        """The conditioning of the rows of x at optimisation step ``step`` (None: unconditional)."""
        return None

    def regularisation(self, step: int) -> Penalty | None:
        """Extra loss terms on the parameters for step ``step``, computed from what :meth:`render` just drew
        (None: the target loss alone)."""
        return None

    def after_step(self, step: int, last: bool) -> None:
        """Called after update ``step`` (1-based count of updates done); ``last``: no update follows."""

    @abstractmethod
    def evaluate(self, final: bool) -> dict[str, float]:
        """Metrics of the current samples (``final``: the run's last evaluation)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """What a resumed run needs of the task beyond the optimiser (tensors and plain values)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""

    @abstractmethod
    def run(self, run_dir: Path, logger: RunLogger, checkpoint: RunCheckpoint) -> dict:
        """The whole run into ``run_dir`` (resuming from ``checkpoint``); returns the final metrics."""


def make_optimizer(parameters: list[Tensor], optimizer_cfg: DictConfig) -> torch.optim.Optimizer:
    """``task.optimizer``: Adam (lr, betas) or SGD (lr)."""
    if optimizer_cfg.name == "adam":
        return torch.optim.Adam(parameters, lr=float(optimizer_cfg.lr), betas=tuple(optimizer_cfg.betas))
    return torch.optim.SGD(parameters, lr=float(optimizer_cfg.lr))


_REGISTRY: dict[str, type[Task]] = {}
BUILTIN_TASKS = {"toy2d": "experiments.toy2d", "text2d": "experiments.text2d", "text3d": "experiments.text3d"}
"""Task name → the module that registers it (imported on first use)."""


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator adding a :class:`Task` to the registry under ``name``."""

    def wrap(cls: type[Task]) -> type[Task]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"task {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_tasks() -> tuple[str, ...]:
    return tuple(sorted(set(_REGISTRY) | set(BUILTIN_TASKS)))


def task_class(name: str) -> type[Task]:
    """The registered task ``name`` (importing a built-in one on first use)."""
    require(name in available_tasks(), "task.name", f"one of {available_tasks()}", name)
    if name not in _REGISTRY:
        importlib.import_module(BUILTIN_TASKS[name])
    return _REGISTRY[name]
