"""kiln review: a label output reviewed in the browser."""
