"""Tuning a model split over the ranks: data, the training-loop pieces, the methods (prompt, LoRA, full), soft prompts."""
