"""The hot path, one module per step: source -> decode -> enrich -> batch -> infer -> encode -> sink."""
