"""loraforge.models (see docs/DESIGN.md)."""
