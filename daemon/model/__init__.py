"""The model on the serving side: versioned model directories, the ensemble, and the transformers implementation (the only torch import)."""
