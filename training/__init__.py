"""Training the embedded tiny avatar: synthetic talking-face data, the training loop, the bundle it writes."""
