"""Conversion: HL7 v2 ADT to a FHIR R4 notification Bundle, as plain data (a pipeline stage; no I/O)."""
