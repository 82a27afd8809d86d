"""loraforge.estimate (see docs/DESIGN.md)."""
