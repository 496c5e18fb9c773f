"""Export: adapter files in kohya's format, written atomically, with their metadata."""
