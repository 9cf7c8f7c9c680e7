"""Networks of the method: the SwiftNet-RN18 segmenter (`swiftnet`) and the DenseFlow (`flow`).

Import the submodule you need; this package imports nothing on its own so that loading one
network never pulls in the other.
"""
