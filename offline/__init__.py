"""The offline renderer: a speech file and a reference image in, an MP4 out (`run_server.py offline`)."""
