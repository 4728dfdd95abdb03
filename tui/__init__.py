"""Anyway's terminal dashboard (Textual). It reads the head's HTTP API only."""
