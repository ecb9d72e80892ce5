"""Representation Workbench: load models, extract layer activations, compare representations."""

__version__ = "0.1.0"
