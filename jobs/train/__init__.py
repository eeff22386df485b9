"""The training driver, the per-worker loop and what it reads."""
