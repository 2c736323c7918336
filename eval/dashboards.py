"""W&B dashboards as code: one report per paper figure family, built with ``wandb-workspaces``.

``python -m eval.dashboards [--entity E] [--project P] [--publish | --spec-out results/dashboards/spec.json]``

Online (``WANDB_MODE=online`` and an API key) it saves the reports to ``E/P`` (sync the offline runs first:
a report's run sets point at the project, which must exist). Otherwise (``WANDB_MODE`` offline or disabled,
or no API key) it writes their specification to ``--spec-out``: per dashboard its sections, each with the
run selection (group, job types, tags) and its panels (the logged keys they plot), and the report as
``wandb-workspaces`` would save it (without the project's internal id, which needs the server).

Runs are selected by the metadata every run sets (``experiments.loggers``, ``eval.tracking``): group (the
paper preset, ``sweep/<name>`` or the study's experiment), job type (the method, or the study) and
``key:value`` tags. Dashboards: ``toy2d`` (the scatter grid and metric curves per setting, the grid
summary), ``toy2d_studies`` (loss landscapes, gradient quality), ``table4_shapes`` / ``table4_sd21``
(FID vs iteration and vs UNet evaluations, final images, the summary), ``text3d_shapes`` (silhouette IoU, prompt
accuracy and opaque volumetric IoU vs iteration, silhouette IoU vs UNet evaluations, each run's turntable video, mesh
and multi-view figure, the summary) and ``sweep_<name>`` for every sweep preset in conf/sweep/ (heatmaps of the
task's objective over each pair of swept keys).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir

from eval.reproduce_toy2d import settings as toy_settings
from eval.table4_figures import METHOD_ORDER as TABLE4_METHODS
from eval.tracking import PROJECT, STUDY_TAG
from experiments.figures import METHOD_COLUMNS
from experiments.io import write_text
from experiments.loggers import guide_label, method_of
from experiments.tasks import task_class
from msd.paths import REPO_ROOT

DEFAULT_SPEC = REPO_ROOT / "results" / "dashboards" / "spec.json"
PANEL_KINDS = ("line", "media", "table", "heatmap")
STEP = "_step"
TEXT3D_METHODS = ("sds", "vsd", "sdi", "msd", "msd_stable")
"""The text-to-3D methods by their job type (``experiments.builders.method_label`` of guidance t3d_<method>)."""
TEXT3D_CURVES = ("silhouette_iou", "prompt_accuracy", "volumetric_iou_opaque")
"""The per-iteration scalars of a text-to-3D run plotted against the iteration."""
TEXT3D_SUMMARY_GROUP = "text3d"
"""The group of the text-to-3D protocol's summary run (job type ``text3d``), as ``table4`` is Table 4's."""


@dataclass(frozen=True)
class RunFilter:
    """Runs of ``group`` whose job type is one of ``job_types`` and that carry every tag of ``tags``."""

    group: str
    job_types: tuple[str, ...]
    tags: tuple[str, ...]

    def matches(self, group: str, job_type: str, tags) -> bool:
        return group == self.group and job_type in self.job_types and set(self.tags) <= set(tags)

    def expression(self):
        """The same selection as a ``wandb_workspaces`` filter expression."""
        from wandb_workspaces import expr

        return expr.And(expr.Metric("Group") == self.group, expr.Metric("JobType").isin(list(self.job_types)),
                        *(expr.Tags().isin([tag]) for tag in self.tags))


@dataclass(frozen=True)
class Panel:
    """``line``: ``keys`` against ``x`` (a logged key or ``_step``); ``media``: the media ``keys`` (images, videos,
    3-D objects: W&B's media panel shows each kind); ``table``: the tables ``keys``; ``heatmap``: the final value of
    ``keys[0]`` over the config keys ``x`` and ``y``."""

    kind: str
    title: str
    keys: tuple[str, ...]
    x: str = STEP
    y: str | None = None

    def __post_init__(self):
        if self.kind not in PANEL_KINDS:
            raise ValueError(f"Panel.kind must be one of {PANEL_KINDS}, got {self.kind!r}")
        if not self.keys:
            raise ValueError(f"Panel.keys of {self.title!r} must name at least one logged key")
        if (self.kind == "heatmap") != (self.y is not None):
            raise ValueError(f"Panel.y of {self.title!r} must be a config key for a heatmap and only then, "
                             f"got {self.y!r}")


@dataclass(frozen=True)
class Section:
    title: str
    runs: RunFilter
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    name: str
    title: str
    description: str
    sections: tuple[Section, ...]


def curves(keys: tuple[str, ...], x: str = STEP, x_title: str = "step") -> tuple[Panel, ...]:
    return tuple(Panel("line", f"{key} vs {x_title}", (key,), x=x) for key in keys)


def toy2d_dashboard() -> Dashboard:
    """The toy grid: per setting the final scatter of every method and its metric curves; the grid summary."""
    sections = []
    for denoiser, guide, scale in toy_settings(["exact", "learned"]):
        label = guide_label(guide, scale)
        runs = RunFilter("toy2d", METHOD_COLUMNS, ("task:toy2d", f"denoiser:{denoiser}", f"guide:{label}"))
        panels = (Panel("media", "final particles", ("scatter",)), *curves(("nll", "in_hdr", "loss")))
        sections.append(Section(f"{denoiser} denoiser, guide {label} (w = {scale:g})", runs, panels))
    summary = RunFilter("toy2d", ("toy2d_grid",), (STUDY_TAG, "task:toy2d"))
    sections.append(Section("Grid summary", summary, (Panel("media", "figure grid", ("figure_grid",)),
                                                      Panel("table", "metrics", ("toy2d_metrics",)))))
    return Dashboard("toy2d", "Toy 2D: particles vs the exact class-A density",
                     "Scatter grid (methods x settings) and metric curves of `make reproduce-toy2d`.", tuple(sections))


def toy2d_studies_dashboard() -> Dashboard:
    """Loss landscapes per denoiser and the gradient-quality study."""
    sections = [Section(f"Loss landscapes, {name} denoiser",
                        RunFilter("toy2d", ("landscapes",), (STUDY_TAG, "task:toy2d", f"denoiser:{name}")),
                        (Panel("media", "landscapes", (f"landscape_{name}",)),
                         Panel("table", "landscape statistics", ("landscapes",))))
                for name in ("exact", "learned")]
    sections.append(Section("Gradient quality", RunFilter("toy2d", ("gradient_quality",), (STUDY_TAG, "task:toy2d")),
                            (Panel("media", "gradient quality", ("gradient_quality",)),
                             Panel("table", "gradient quality", ("gradient_quality",)))))
    return Dashboard("toy2d_studies", "Toy 2D studies: loss landscapes and gradient quality",
                     "`python -m eval.landscapes` and `python -m eval.gradient_quality`.", tuple(sections))


def table4_dashboard(prior: str, group: str) -> Dashboard:
    """Table 4 on ``prior`` (runs of the paper preset ``group``): FID vs iteration and vs compute, images."""
    keys = ("fid", "fid_true", "prompt_accuracy") if prior == "shapes" else ("fid",)
    runs = RunFilter(group, TABLE4_METHODS, ("task:text2d", f"prior:{prior}"))
    panels = (*curves(keys, STEP, "iteration"), Panel("line", "fid vs UNet evaluations", ("fid",), x="unet_evals"),
              Panel("media", "final images", ("images",)))
    summary = RunFilter("table4", ("table4",), (STUDY_TAG, "task:text2d", f"prior:{prior}"))
    summary_panels = (Panel("media", "FID vs iteration / compute", ("fid_vs_iter", "fid_vs_compute")),
                      Panel("table", "Table 4", ("table4", "fid_vs_iter")))
    return Dashboard(f"table4_{prior}", f"Table 4 on {prior}: text-to-2D FID vs iterations",
                     f"`make reproduce-table4 PRIOR={prior}`: every method's run and the summary.",
                     (Section("Runs", runs, panels), Section("Summary", summary, summary_panels)))


def text3d_dashboard(prior: str = "shapes3d", group: str = "text3d_shapes") -> Dashboard:
    """Text-to-3D on ``prior`` (runs of the paper preset ``group``): the geometry and accuracy curves vs iteration,
    silhouette IoU vs compute, each run's turntable, mesh and multi-view figure; the protocol's summary."""
    runs = RunFilter(group, TEXT3D_METHODS, ("task:text3d", f"prior:{prior}"))
    panels = (*curves(TEXT3D_CURVES, STEP, "iteration"),
              Panel("line", "silhouette_iou vs UNet evaluations", ("silhouette_iou",), x="unet_evals"),
              Panel("media", "turntable", ("turntable",)), Panel("media", "mesh", ("mesh",)),
              Panel("media", "multi-view", ("multiview",)))
    summary = RunFilter(TEXT3D_SUMMARY_GROUP, ("text3d",), (STUDY_TAG, "task:text3d", f"prior:{prior}"))
    summary_panels = (Panel("media", "multi-view grid", ("multiview_grid",)),
                      Panel("table", "text-to-3D", ("text3d", "text3d_curves")))
    return Dashboard(group, f"Text-to-3D on {prior}: geometry and prompt accuracy vs iterations",
                     f"The text-to-3D protocol on {prior}: every method's run (turntables, meshes, multi-view "
                     f"figures) and the summary.", (Section("Runs", runs, panels), Section("Summary", summary,
                                                                                           summary_panels)))


def sweep_presets(conf_dir: Path) -> list[str]:
    return sorted(p.stem for p in (conf_dir / "sweep").glob("*.yaml") if not p.stem.startswith("_"))


def sweep_dashboard(conf_dir: Path, name: str) -> Dashboard:
    """A sweep preset: heatmaps of the task's objective over every pair of swept keys, and its curve."""
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("config", overrides=[f"sweep={name}"], return_hydra_config=True)
    swept = list(cfg.hydra.sweeper.params)
    task = cfg.task.name
    objective = task_class(task).objective
    runs = RunFilter(f"sweep/{name}", (method_of(cfg.guidance),), (f"sweep:{name}", f"task:{task}"))
    heatmaps = tuple(Panel("heatmap", f"{objective}: {x} x {y}", (objective,), x=x, y=y)
                     for x, y in itertools.combinations(swept, 2))
    return Dashboard(f"sweep_{name}", f"Sweep {name}: {objective} over {', '.join(swept)}",
                     f"`python -m experiments.run sweep={name}` (conf/sweep/{name}.yaml).",
                     (Section("Runs", runs, (*heatmaps, *curves((objective,)))),))


def dashboards(conf_dir: Path = REPO_ROOT / "conf") -> list[Dashboard]:
    return [toy2d_dashboard(), toy2d_studies_dashboard(), table4_dashboard("shapes", "table4_shapes"),
            table4_dashboard("sd21", "table4"), text3d_dashboard(),
            *(sweep_dashboard(conf_dir, s) for s in sweep_presets(conf_dir))]


# --- wandb-workspaces ------------------------------------------------------------------------------------------

def wandb_panel(panel: Panel, panel_id: str):
    import wandb_workspaces.reports.v2 as wr

    if panel.kind == "line":
        made = wr.LinePlot(title=panel.title, x="Step" if panel.x == STEP else panel.x, y=list(panel.keys))
    elif panel.kind == "media":
        made = wr.MediaBrowser(title=panel.title, media_keys=list(panel.keys))
    elif panel.kind == "table":
        made = wr.WeavePanelSummaryTable(table_name=panel.keys[0])
    else:
        made = wr.ScatterPlot(title=panel.title, x=wr.Config(panel.x), y=wr.Config(panel.y),
                              z=wr.SummaryMetric(panel.keys[0]))
    made._id = panel_id  # deterministic ids: the committed spec changes only when a definition does
    return made


def wandb_panels(panel: Panel, panel_id: str) -> list:
    """A table panel per table key (a summary table shows one table); one panel otherwise."""
    if panel.kind != "table":
        return [wandb_panel(panel, panel_id)]
    return [wandb_panel(Panel("table", panel.title, (key,)), f"{panel_id}-{key}") for key in panel.keys]


def wandb_report(dashboard: Dashboard, entity: str, project: str, online: bool):
    """The dashboard as a ``wandb_workspaces`` report; its run sets name ``entity/project`` only when
    ``online`` (the library then looks the project up on the server)."""
    import wandb_workspaces.reports.v2 as wr

    blocks = [wr.P(dashboard.description)]
    for i, section in enumerate(dashboard.sections):
        runset = wr.Runset(entity=entity if online else "", project=project if online else "", name=section.title,
                           filters=section.runs.expression(), groupby=["JobType"])
        runset._id = f"{dashboard.name}-{i}"
        panels = [made for j, panel in enumerate(section.panels)
                  for made in wandb_panels(panel, f"{dashboard.name}-{i}-{j}")]
        blocks += [wr.H2(section.title), wr.PanelGrid(runsets=[runset], panels=panels)]
    return wr.Report(project=project, entity=entity, title=dashboard.title, description=dashboard.description,
                     blocks=blocks, width="fluid")


def specification(boards: list[Dashboard], entity: str, project: str) -> dict:
    """What the offline command writes: the definitions and the reports as wandb-workspaces would save them."""
    out = {"entity": entity, "project": project, "dashboards": []}
    for board in boards:
        model = wandb_report(board, entity, project, online=False)._to_model()
        out["dashboards"].append({**asdict(board), "report": model.model_dump(by_alias=True, exclude_none=True,
                                                                             mode="json")})
    return out


def online() -> bool:
    """``WANDB_MODE=online`` (unset means offline here, as for the runs) and a W&B API key."""
    if os.environ.get("WANDB_MODE", "offline") != "online":
        return False
    import wandb

    try:
        wandb.Api()
    except wandb.errors.UsageError:  # no API key
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entity", default=None, help="W&B entity (default: the API key's default entity)")
    parser.add_argument("--project", default=PROJECT)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--publish", action="store_true", help="save the reports (fails unless online)")
    mode.add_argument("--spec-out", type=Path, default=None, help=f"offline: the spec file (default {DEFAULT_SPEC})")
    args = parser.parse_args(argv)
    boards = dashboards()
    if args.publish or (args.spec_out is None and online()):
        if not online():
            parser.error("--publish needs WANDB_MODE=online and a W&B API key (`wandb login`)")
        import wandb

        entity = args.entity or wandb.Api().default_entity
        for board in boards:
            report = wandb_report(board, entity, args.project, online=True).save()
            print(f"{board.name}: {report.url}")
        return
    spec_out = args.spec_out or DEFAULT_SPEC
    write_text(spec_out, json.dumps(specification(boards, args.entity or "", args.project), indent=1) + "\n")
    print(f"offline: wrote the specification of {len(boards)} dashboards to {spec_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
