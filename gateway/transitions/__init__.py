"""Care transitions: encounters linked into episodes, flags, the follow-up worklist, the ED e-alert, SNF stays.

Stages (data in, data out): :mod:`~gateway.transitions.calendar` (business
days), :mod:`~gateway.transitions.worklist` (the tasks a discharge or an ED
visit creates, from rules in ``mappings/worklist.toml``),
:mod:`~gateway.transitions.episodes` (A01/A04 → A02/A08 → A03 as one visit),
:mod:`~gateway.transitions.alerts` (flags; the e-alert as an HL7 v2 message),
:mod:`~gateway.transitions.snf` (the SNF report) and
:mod:`~gateway.transitions.care` (what a member's new events mean: episodes,
tasks made and closed, e-alerts). The store keeps them
(:mod:`gateway.store.transitions`); :mod:`gateway.app.transitions_service`
runs them.
"""
