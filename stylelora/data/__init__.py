"""Data: from a folder of images and captions to batches of pixels and caption strings.

This package knows nothing of models: latents and text embeddings are the families' business.
"""
