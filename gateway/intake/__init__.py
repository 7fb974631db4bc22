"""Intake: what happens on the connection's path -- store the frame, then answer it (``receiver``, ``ack``)."""
