"""Deployment: the denoiser as ONNX (any ONNX Runtime) and TensorRT engines, verified against PyTorch.

    <export dir>/                        default: <checkpoint>/export, beside <checkpoint>/pipeline
      denoiser.onnx                      the graph (+ denoiser.onnx.data when the weights pass 1.5 GiB)
      manifest.json                      settings, shapes, sha256, versions, node count, verification errors,
                                         and one entry per TensorRT engine built from this graph
      engines/<key>.plan                 TensorRT engines, keyed by ONNX sha + TensorRT version + GPU + profile
      engines/timing-<gpu>-trt<v>.cache  TensorRT timing caches

`onnx_export` writes the graph, `verify` compares it with PyTorch, `tensorrt_build` builds engines and
`runtime.load_exported_denoiser` runs either as `denoise(x, t, y) -> eps`. Importing this package imports
neither onnx nor TensorRT; each is imported where it is used.
"""

from __future__ import annotations

from wdmctl.export.runtime import load_exported_denoiser

__all__ = ["load_exported_denoiser"]
