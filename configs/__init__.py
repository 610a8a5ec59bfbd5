"""Presets of the study's settings, one JSON file each (installed as `aerl_fast.configs`)."""
