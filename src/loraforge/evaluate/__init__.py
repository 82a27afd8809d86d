"""loraforge.evaluate (see docs/DESIGN.md)."""
