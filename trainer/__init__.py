"""mailtriage_trainer: harvests folder-sorted mail, fine-tunes an adapter, evaluates and promotes it."""
