"""Persistent state: the SQLite decision store, stats, and corrections found from staff moves."""
