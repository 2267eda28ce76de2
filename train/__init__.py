"""postflow offline pipeline: dataset -> posterior samples -> aligned, canonical weights
-> flow matching -> ONNX bundle (see docs/bundle-format.md)."""

PIPELINE_VERSION = "0.1.0"
