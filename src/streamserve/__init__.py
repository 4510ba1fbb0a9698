"""streamserve: streaming real-time inference on Kafka, Redis and ONNX Runtime."""

__version__ = "0.1.0"
