"""Oracles: other projects' ADT corpora and expected FHIR, read from ``../shared/corpus``.

The modules here read the shared corpus (never copied into the repository),
run Herald over it and compare Herald's output with the other projects'
expected output. The tests in ``tests/test_oracle_*.py`` and the report
``bench/oracle_report.py`` both use them. The tables beside them are data:
``corpus_expectations.toml`` (what Herald must do with each notable corpus
file, and which rejection reasons are legitimate), ``msft_known_differences.toml``
and ``reportstream_known_differences.toml`` (justified differences, with the
reason for each) and ``open_defects.toml`` (converter defects still open, which
turn the affected test cases into strict expected failures).
"""
