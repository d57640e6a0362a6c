"""Model merging: methods (methods.py, a registry of pure tensor functions) and the streaming
reader/writer that applies one to whole checkpoints tensor by tensor (stream.py)."""
