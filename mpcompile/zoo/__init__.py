"""Models bundled with mpcompile (trained on scikit-learn's digits) and their data split.

``mpcompile.zoo.bundled`` (paths, data, ONNX accuracy) needs no torch; ``mpcompile.zoo.digits``
(the torch modules) imports torch and is only imported where a torch module is wanted.
"""
