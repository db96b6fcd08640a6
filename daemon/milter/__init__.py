"""The milter intake: Postfix (``smtpd_milters``, ``non_smtpd_milters``) and Sendmail hand each message
to mailtriage over the Sendmail milter protocol and apply our header edits themselves, so no
reinjection port and no second SMTP hop are needed.

``protocol`` is the pure codec (bytes in, values out and back), ``session`` the pure per-connection
state machine (what to answer, what to hold), ``server`` the asyncio listener on the daemon's loop.
"""
