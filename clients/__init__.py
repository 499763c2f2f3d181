"""Clients of the kpisettle service: the Python library (`clients.kpisettle_client`)."""
