"""Model definitions: one shared decoder (common/) and per-model argument readers."""
