"""Pure shared pieces: mail text, labels, the Classifier protocol, routing. The trainer may import these; nothing here does I/O."""
