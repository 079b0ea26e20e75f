"""Getting models and data in and out: ONNX loading and atomic writing, calibration and
evaluation data, ONNX Runtime execution, shape specs. Nothing here decides what to prune."""
