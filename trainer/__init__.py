"""mailtriage_trainer: builds model versions (LoRA adapters) for the mailtriage daemon from sorted mail."""
