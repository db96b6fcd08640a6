"""The IMAP edge: connection, actions, and the per-mailbox watcher."""
