"""Transitional re-export: the one atomic-write module is `data.fsio`."""
from data.fsio import atomic_save_safetensors, atomic_write, atomic_write_json, atomic_write_text, fsync_dir  # noqa: F401
