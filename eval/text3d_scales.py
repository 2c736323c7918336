"""MSD's bandwidths for text-to-3D on ShapesWorld-3D, by the rule text-to-2D uses (conf/guidance/t2d_msd.yaml),
measured on true renders alone: ``λ₀`` = half the median distance between two renders of the same view prompt
("a red cube, front view": sizes, cameras and lights drawn as the prior was trained on them), ``λ_min`` = half the
median distance between a render and its one-pixel shift. Distances in the prior's sample space ([−1, 1] pixels,
32 × 32 × 3). Writes results/text3d/msd_scales.csv (``python -m eval.text3d_scales``)."""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from experiments.io import write_csv
from msd.paths import repo_path
from msd.rendering import CameraDistribution, sample_cameras, view_indices
from shapes.world3d import PROMPTS, sample_scenes, world_images


def scales(per_caption: int = 48, resolution: int = 32, seed: int = 0) -> pd.DataFrame:
    generator = torch.Generator().manual_seed(seed)
    distribution = CameraDistribution()
    images, labels = [], []
    for index, caption in enumerate(PROMPTS):
        cameras = sample_cameras(distribution, per_caption, resolution, resolution, generator)
        scene = sample_scenes([caption] * per_caption, generator)
        with torch.no_grad():
            images.append(world_images(scene, cameras))
        labels.append(index * 4 + view_indices(cameras.elevation_deg, cameras.azimuth_deg, distribution))
    images, labels = torch.cat(images), torch.cat(labels)
    flat = images.flatten(1)
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool)
    pair = torch.cdist(flat, flat)[same]
    one_pixel = (torch.roll(images, shifts=1, dims=-1) - images).flatten(1).norm(dim=1)
    rows = [("renders", len(images)), ("dimension", flat.shape[1]),
            ("same_view_prompt_pair_distance_median", pair.median().item()),
            ("one_pixel_shift_distance_median", one_pixel.median().item()),
            ("lambda0", pair.median().item() / 2), ("lambda_min", one_pixel.median().item() / 2)]
    return pd.DataFrame([{"quantity": k, "value": float(v)} for k, v in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=repo_path("results/text3d/msd_scales.csv"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table = scales()
    write_csv(args.out, table)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
