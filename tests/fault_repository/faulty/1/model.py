"""Test-only model: doubles its input, fails on demand, takes a little time."""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

EXECUTE_S = 0.05


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(EXECUTE_S)
        xs = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
        if any((x == -1).any() for x in xs):
            # Unexpected exceptions fail the whole batch with a 500 carrying this message.
            raise RuntimeError("injected failure: x contains -1")
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("y", (2 * x).astype(np.float32))])
            for x in xs
        ]
