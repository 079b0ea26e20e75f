"""Pure numerical kernels (numpy/scipy only): nothing here knows about ONNX or torch.

These modules are shared by the ONNX passes and the torch front end, and are tested on
matrices we generate with known ground truth.
"""
