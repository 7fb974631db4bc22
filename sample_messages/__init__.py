"""Synthetic sample ADT messages and a sample roster, written by the Herald team: no code.

Installed as ``gateway.sample_messages``; see :mod:`gateway.resources`.
"""
