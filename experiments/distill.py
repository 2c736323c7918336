"""The one distillation loop every task runs through (toy 2D, text-to-2D, and any task registered later).

Per step k (0-based): ``x = task.render()`` (differentiable in the task's parameters ψ), the guidance gives a
detached target ``y = guidance(x, k, generator, task.conditioning(k)).target``, and the optimiser takes one
step on the one loss ``L = ½‖x − sg(y)‖²`` (summed per sample, averaged over the batch; docs/design.md §3),
plus the task's own regularisers of its parameters when it has any (``task.regularisation(k)``: text-to-3D's
orientation / sparsity / opacity terms; the ``loss`` column stays the target loss).
Before step k the loop stops if ``guidance.should_stop(k)`` (MSD: bandwidth below λ_min).

Rows: step 0 is scored before the first update; then every ``log_every`` steps (and at the last) a row holds
the step, the cumulative network evaluations (when the task names an ``evals_column``), the loss of that update
and every aux scalar of the guidance (and the task's regulariser terms); every ``eval_every`` steps, and at the last step with ``final=True``, the
row also gets ``task.evaluate``. ``seconds`` times render + guidance + update only (evaluation excluded).

Checkpoints (``experiments.checkpoint``): every ``checkpoint.every`` steps the loop saves the task's state,
the optimiser's, the guidance's, the generator's and the rows; the same call resumes bitwise identically.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from experiments.checkpoint import RunCheckpoint
from experiments.loggers import RunLogger
from experiments.tasks import Task
from msd.guidance import Guidance, target_loss


@dataclass
class Outcome:
    """Final samples x (detached), steps taken, loop seconds (evaluation excluded), network evaluations per
    sample, and the metric rows."""

    x: Tensor
    steps: int
    seconds: float
    evals: float
    rows: list[dict]


def distill(task: Task, guidance: Guidance, optimizer: torch.optim.Optimizer, generator: torch.Generator,
            checkpoint: RunCheckpoint, logger: RunLogger, *, steps: int, log_every: int = 1, eval_every: int = 1,
            progress_bar: bool = False, label: str = "") -> Outcome:
    """Optimise ``task``'s parameters with ``optimizer`` against ``guidance`` for at most ``steps`` steps."""
    step_key, evals_key = task.step_column, task.evals_column

    def counters(done: int, evals: float) -> dict:
        return {step_key: done, **({evals_key: evals} if evals_key else {})}

    saved = checkpoint.load()
    if saved is None:
        rows = [{**counters(0, 0.0), **task.evaluate(final=False)}]
        logger.log_scalars(rows[-1], step=0)
        seconds, evals, done = 0.0, 0.0, 0
    else:
        task.load_state_dict(saved["task"])
        optimizer.load_state_dict(saved["optimizer"])
        guidance.load_state_dict(saved["guidance"])
        generator.set_state(saved["generator"])
        rows = [dict(row) for row in saved["rows"]]
        seconds, evals, done = saved["seconds"], saved["evals"], saved["step"]
        print(f"resuming {label or task.name} from step {done} ({checkpoint.path})", flush=True)
    closed = False  # whether the last row holds the final evaluation
    with tqdm(total=steps, initial=done, desc=label, disable=not progress_bar, mininterval=1.0) as bar:
        for step in range(done, steps):
            if guidance.should_stop(step):
                break
            tic = time.perf_counter()
            x = task.render()
            out = guidance(x.detach(), step, generator, task.conditioning(step))
            loss = target_loss(x, out.target)
            penalty = task.regularisation(step)
            optimizer.zero_grad(set_to_none=True)
            (loss if penalty is None else loss + penalty.total).backward()
            optimizer.step()
            seconds += time.perf_counter() - tic
            loss_value = loss.item()
            done, evals = step + 1, evals + float(out.aux.get("nfe", 0.0))
            last = done == steps or guidance.should_stop(done)
            task.after_step(done, last)
            if done % log_every == 0 or last:
                row = {**counters(done, evals), "loss": loss_value, **out.aux,
                       **({} if penalty is None else penalty.scalars())}
                if done % eval_every == 0 or last:
                    row.update(task.evaluate(final=last))
                    closed = last
                rows.append(row)
                logger.log_scalars(row, step=done)
            if checkpoint.due(done) and not last:
                checkpoint.save(done, {"task": task.state_dict(), "optimizer": optimizer.state_dict(),
                                       "guidance": guidance.state_dict(), "generator": generator.get_state(),
                                       "rows": [dict(row) for row in rows], "seconds": seconds, "evals": evals})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4g}", refresh=False)
    if not closed:  # stopped before its first step (MSD's bandwidth already below λ_min)
        if rows[-1][step_key] != done:
            rows.append(counters(done, evals))
        rows[-1].update(task.evaluate(final=True))
        logger.log_scalars(rows[-1], step=done)
    return Outcome(task.render().detach(), done, seconds, evals, rows)
