"""The IR: Program, capture, matchers, verifier, printer, serialization."""
