"""The product demo: a synthetic support mailbox (corpus.py) to train on and triage end to end."""
