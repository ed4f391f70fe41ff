"""Prefect flows (not part of the installed `dexml` package; Prefect loads them by path)."""
