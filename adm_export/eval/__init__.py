"""Evaluation: embedders, Fréchet distance and its companions (KL, IS), harness and report."""
