"""What turns audio windows into clips: the streaming scheme, the few-step sampler, the clip windows, the session."""
