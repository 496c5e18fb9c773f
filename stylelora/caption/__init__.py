"""Captions for a folder of images: `stylelora caption` with vision-language models and taggers."""
