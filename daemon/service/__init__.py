"""The long-running daemon: one event loop, its threads, jobs, systemd notification and metrics."""
