"""loraforge.serve (see docs/DESIGN.md)."""
