"""Herald: HL7 v2 ADT in over MLLP, FHIR R4 encounter notifications out. See docs/architecture.md for the map."""
