"""Hydra entry point and task drivers: build objects from the config, run the optimisation, write the run dir."""
