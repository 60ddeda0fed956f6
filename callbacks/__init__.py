"""Lightning callbacks of talr, one per file."""
