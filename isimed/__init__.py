"""ISImed in JAX: self-supervised pretraining so that crop-embedding distances match physical distances."""
