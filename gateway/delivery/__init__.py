"""Delivery: who is told (``routing``, a pipeline stage) and telling them (``worker``: file drop, FHIR)."""
