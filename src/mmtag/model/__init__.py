"""The fitted model: the Tagger, its bundle on disk, its ONNX export."""
