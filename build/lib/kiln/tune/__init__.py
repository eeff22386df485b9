"""Kiln tune: the search, its trials' plan and its results."""
