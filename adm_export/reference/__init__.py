"""A small procedural text-to-audio world: captioned synthetic sounds for training and evaluation."""
