"""`python -m client_cam ...`: see client_cam/cli.py."""
import sys

from client_cam.cli import main

sys.exit(main())
