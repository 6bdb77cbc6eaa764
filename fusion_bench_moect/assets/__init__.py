"""Offline assets: real models prepared from PyPI packages (no model hub at run time)."""
