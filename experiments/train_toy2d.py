"""Train the committed toy2d denoisers: ``python -m experiments.train_toy2d [NAME ...]`` (``make toy2d-weights``).

Writes ``toy2d/weights/<NAME>.pt`` (state_dict, constructor kwargs, training metadata), each atomically
(temp file + rename), for the fractal's A, AB, A_weak and for spiral, spiral_weak, pinwheel, pinwheel_weak
(``toy2d.datasets``: one model of the whole mixture and a weak autoguidance guide each, no CFG guide as
they have no classes). EDM2 trained the main model for 4096 iterations at batch 4096 and the
guides (4 × 32) for 512; to fit about two minutes on one CPU thread the main model here gets 2048
iterations at batch 2048 (a quarter of EDM2's samples) and the guides 512 at batch 1024 (``MODELS``;
the exact score of the 1016/2032-component mixture dominates the cost). Every dataset gets the same
recipe. For every model the script
prints the training time and the held-out loss (:func:`toy2d.denoisers.score_matching_loss` on fresh
exact samples, σ drawn as in training) next to the loss of the untrained model (the Gaussian
``N(0, σ_data² + σ²)``).

Training runs on one CPU thread: the work is a stream of small ops that gain little from a second
thread, and with two OpenMP threads on a shared 2-core machine one busy core made an iteration ~20×
slower (measured); one thread keeps the time predictable.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from toy2d.datasets import toy_mixture
from toy2d.denoisers import MODEL_NAMES, WEIGHTS_DIR, MLPDenoiser, score_matching_loss, train_mlp_denoiser

_MAIN = dict(hidden=64, layers=4, iterations=2048, batch=2048, seed=0)
_GUIDE = dict(hidden=32, layers=4, iterations=512, batch=1024, seed=0)
MODELS = {
    "A": dict(dataset="fractal", classes="A", **_MAIN),
    "AB": dict(dataset="fractal", classes="AB", **_GUIDE),
    "A_weak": dict(dataset="fractal", classes="A", **_GUIDE),
    "spiral": dict(dataset="spiral", classes="all", **_MAIN),
    "spiral_weak": dict(dataset="spiral", classes="all", **_GUIDE),
    "pinwheel": dict(dataset="pinwheel", classes="all", **_MAIN),
    "pinwheel_weak": dict(dataset="pinwheel", classes="all", **_GUIDE),
}
HELD_OUT = dict(n=16384, seed=12345, p_mean=-2.3, p_std=1.5)


def held_out_loss(net: MLPDenoiser, classes: str, dataset: str = "fractal") -> float:
    """Score-matching loss of ``net`` on fixed fresh samples of the ``dataset`` mixture restricted to ``classes``."""
    mixture = toy_mixture(dataset, classes)
    generator = torch.Generator().manual_seed(HELD_OUT["seed"])
    sigma = torch.exp(HELD_OUT["p_mean"] + HELD_OUT["p_std"] * torch.randn(HELD_OUT["n"], generator=generator))
    x = mixture.sample(HELD_OUT["n"], sigma, generator=generator)
    return score_matching_loss(net.eval(), mixture, x, sigma).item()


def train_one(name: str) -> None:
    spec = dict(MODELS[name])
    dataset, classes = spec.pop("dataset"), spec.pop("classes")
    losses: list[float] = []
    start = time.perf_counter()
    net = train_mlp_denoiser(toy_mixture(dataset, classes), on_step=lambda i, loss: losses.append(loss), **spec)
    seconds = time.perf_counter() - start
    tail = losses[-64:]
    meta = dict(dataset=dataset, classes=classes, iterations=spec["iterations"], batch=spec["batch"], seed=spec["seed"],
                train_seconds=round(seconds, 1), final_train_loss=sum(tail) / len(tail),
                held_out_loss=held_out_loss(net, classes, dataset),
                held_out_loss_at_init=held_out_loss(MLPDenoiser(**net.config), classes, dataset))
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    path = WEIGHTS_DIR / f"{name}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(dict(config=net.config, state_dict=net.state_dict(), meta=meta), tmp)
    os.replace(tmp, path)
    print(f"{name:13s} {dataset:8s} {classes:3s} {net.config['layers']}x{net.config['hidden']:<3d} "
          f"{spec['iterations']} it x {spec['batch']}: {seconds:6.1f} s, train loss (last 64) "
          f"{meta['final_train_loss']:.4f}, held-out loss {meta['held_out_loss']:.4f} "
          f"(untrained {meta['held_out_loss_at_init']:.4f}) -> {path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"models to train, from {MODEL_NAMES} (default: all)")
    names = parser.parse_args().names or list(MODEL_NAMES)
    if unknown := sorted(set(names) - set(MODEL_NAMES)):
        parser.error(f"unknown model(s) {unknown}; allowed: {MODEL_NAMES}")
    torch.set_num_threads(1)
    start = time.perf_counter()
    for name in names:
        train_one(name)
    print(f"total training time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
