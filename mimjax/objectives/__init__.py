"""Training objectives: one small module each, exposing `make(config) -> Objective`."""
