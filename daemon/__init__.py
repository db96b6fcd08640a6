"""mailtriage: file every new support email into its category with a small fine-tuned model.

The data path reads from the module names: mailtext (bytes -> text) -> model (text ->
Prediction) -> routing (Prediction -> Decision) -> actions (Decision -> IMAP). The trainer
(`mailtriage_trainer`) builds the model directory that `model` loads.
"""

__version__ = "0.1.0"
