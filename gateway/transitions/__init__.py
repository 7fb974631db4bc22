"""Care transitions: encounters linked into episodes, the follow-up worklist, SNF stays.

Stages (data in, data out): :mod:`~gateway.transitions.calendar` (business
days), :mod:`~gateway.transitions.worklist` (the tasks a discharge or an ED
visit creates, from rules in ``mappings/worklist.toml``),
:mod:`~gateway.transitions.episodes` (A01/A04 → A02/A08 → A03 as one visit).
"""
