"""Training data: tokenizer, packed sequences, and each rank's batches."""
