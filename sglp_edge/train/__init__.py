"""Training: the baseline trainer, the resumable training engine, and the KD recovery fine-tune."""
