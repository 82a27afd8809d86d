"""loraforge.export (see docs/DESIGN.md)."""
