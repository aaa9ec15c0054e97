"""Measures of what a viewer sees: lip sync and identity on decoded frames (uses the model; the model does not know it)."""
