"""Datasets -> Conversation -> template rendering -> input_ids/labels (see docs/DESIGN.md)."""
