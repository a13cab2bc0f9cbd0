"""Calibration and evaluation data sets, the built-in ones included."""
