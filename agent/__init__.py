"""edge-agent: the device daemon, and the wire schema shared by the converter and fleet tools.

This package stays light: no torch, no tensorflow, no onnx tooling, and it never imports
`converter` or `fleet` (tests/test_layering.py enforces it).
"""

__version__ = "0.1.0"
