"""The pages and tables kiln writes: model cards, label, eval and demo reports."""
