"""Mapping data read at start-up (code tables, the matching model, roster formats): no code.

Installed as ``gateway.mappings``; see :mod:`gateway.resources`.
"""
