"""Runtimes: what runs an artifact's graph (ONNX Runtime, torch, OpenVINO), the runtime table,
the machine's usable cores, and the recorded choice of runtime.
"""
