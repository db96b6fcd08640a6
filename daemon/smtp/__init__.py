"""The SMTP edge: the content filter in front of the mailbox."""
