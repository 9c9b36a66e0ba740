"""Models: loading the user's checkpoint, choosing target layers, preprocessing, and the probe model."""
