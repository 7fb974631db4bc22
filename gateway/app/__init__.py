"""The application layer: the CLI, the service wiring, the demo, and the library the CLI (and a console) calls."""
