"""Everything RKNN in one room: the compiler (compile, recipe, calibration, agreement), the rknn-sim and npu backends,
their shared tensor I/O (io.py), and the rknn-toolkit2 environment (toolkit.py; venv/ runs inside it).

Imports nothing: venv/ modules run in the toolkit's own interpreter, which imports this package too.
"""
