"""The network face: signaling, sessions, audio windows, paced tracks and the engine bridge."""
