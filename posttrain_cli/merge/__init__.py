"""Model merging: what each method uses (spec.py, torch-free, read by validation and plan), the
methods themselves (methods.py, a registry of pure tensor functions), and the streaming merge that
applies one to whole checkpoints tensor by tensor (stream.py: the loop; shards.py: safetensors in
and out; checks.py: can these models be merged; memory.py: resident-memory probes)."""
