"""lmms-eval model classes, one module per architecture family."""
