"""Backends behind runtime.engine.Engine: ort-cpu, ort-cuda, tensorrt."""
