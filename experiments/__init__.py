"""Hydra entry point and task drivers: build objects from the config, run the optimisation, write the run dir."""
from omegaconf import OmegaConf

# ${mirror_cfg:w} = 2 − w: the CFG scale whose guidance direction is the opposite of w's in our convention
# ε_u + w (ε_c − ε_u) (threestudio's CFG-A scale s = w − 1 negated: SDI's inversion scale −s).
if not OmegaConf.has_resolver("mirror_cfg"):
    OmegaConf.register_new_resolver("mirror_cfg", lambda scale: 2.0 - float(scale))

import experiments.loggers  # noqa: E402,F401  (registers the resolvers of conf/logger/wandb.yaml)
