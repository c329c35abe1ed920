"""Test-only model: its stub process dies (SIGKILL) whenever it is asked anything."""

import os
import signal


class TritonPythonModel:
    def execute(self, requests):
        os.kill(os.getpid(), signal.SIGKILL)
