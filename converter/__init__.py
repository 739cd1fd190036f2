"""edge-convert: teacher + data in; a distilled, optionally pruned, int8 student out.

Stages (each a module, each a subcommand): data -> teacher -> distill -> prune -> export ->
quantize (ONNX QDQ, TFLite full-int8) -> compile (NPU) -> evaluate -> report -> bundle.
`pipeline.run` chains them and builds in a temporary directory, renamed into place only on
success, so a failure never leaves partial output.
"""
