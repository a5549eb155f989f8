"""Launchers for Flower runs of this project (see :mod:`runner.simulation`)."""
