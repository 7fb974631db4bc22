"""The pipeline: one stored message to one outcome.

``process`` is the stage; ``workers`` runs it in worker processes; ``runner`` is the service.
"""
