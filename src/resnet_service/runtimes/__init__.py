"""Inference runtimes behind one small protocol: a float32 NCHW batch in, logits out.

Everything above this seam (decoding, batching, Top-k, HTTP) is numpy, so a worker serving
from OpenVINO or ONNX Runtime never imports torch.
"""
