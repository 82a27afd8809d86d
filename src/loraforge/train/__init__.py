"""loraforge.train (see docs/DESIGN.md)."""
