"""Test-only model: adds one, slowly (a fixed 250 ms per batch of at most two)."""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

EXECUTE_S = 0.25


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(EXECUTE_S)
        xs = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("y", (x + 1).astype(np.float32))])
            for x in xs
        ]
