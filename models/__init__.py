"""Everything about models: catalogue, store, provenance, VAD and the runner."""
