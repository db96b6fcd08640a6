"""Measurements of the product (accuracy, speed, the daemon against a real Dovecot) for RESULTS.md.

Each module runs as ``.venv/bin/python -m benchmarks.NAME [--quick]``, prints markdown rows and
writes JSON under ``bench-out/``. Nothing here is imported by the product or the tests.
"""
