"""Built-in examples that need no download."""
