"""Evaluation: toy metrics, figures and the reproduce scripts; reads run directories, writes results/."""
