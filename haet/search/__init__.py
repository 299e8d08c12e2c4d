"""Budgeted searches: QS-NAS (`haet.search.qs`), the least-energy bit-width × width scale."""
