"""Calibration: prompt sets, sampler trajectories, selection of calibration points, the cache."""
