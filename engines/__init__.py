"""Stage 2 of export -> engines -> runtime: compile a bundle's ONNX graphs into
cached, per-machine artifacts (TensorRT FP16 plans, ONNX Runtime CUDA fp16 graphs).
Entry point: `python -m engines.build` (engines/README.md)."""
