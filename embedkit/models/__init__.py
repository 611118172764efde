"""The model store and everything that makes an artifact: export, import, parity probes,
fine-tuned backbones, fp16 and int8 variants, and :func:`resolve` (a spec -> an artifact).
"""
