"""Sampling: preview images while training, and rendering with a finished adapter."""
