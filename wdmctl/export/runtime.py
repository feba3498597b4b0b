"""Run an exported denoiser: ONNX Runtime (CUDA with I/O binding and, for a static batch, ONNX Runtime's
CUDA graphs; or CPU) or a TensorRT engine replayed with CUDA graphs, behind the call signature of the
PyTorch model.

`load_exported_denoiser(export_dir, backend, device)` returns `denoise(x, t, y) -> eps` taking and
returning torch tensors, like `model(x, t, y)`. A static export runs one batch size; the wrapper splits
larger batches and pads smaller ones (repeating the last row), so the sampler's last, partial batch and
unguided calls of a guidance-batch export work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from wdmctl.errors import MissingDependency, WdmError, first_line
from wdmctl.export.manifest import read_manifest, require_intact_onnx

BACKENDS = ("onnx", "trt")
INSTALL_HINT = 'pip install "wdmctl[export]"'
# ORT's CUDA EP runs once before it captures; a failure in these first runs is a capture it cannot make
CAPTURE_RUNS = 2
NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependency(f"ONNX Runtime is not installed: {INSTALL_HINT}") from None
    return onnxruntime


def default_provider() -> str:
    """The provider wdmctl verifies and runs graphs on here: CUDA with onnxruntime-gpu and a GPU, else CPU."""
    cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in import_onnxruntime().get_available_providers()
    return "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"


def cuda_provider_options(device_index: int, cuda_graph: bool = False, use_tf32: bool = False,
                          stream: torch.cuda.Stream | None = None) -> dict[str, str]:
    """The CUDA execution provider's options wdmctl runs with (recorded in the manifest as well).

    `cuda_graph`: ORT captures the whole run once and replays it (fixed shapes, every node on the CUDA EP,
    inputs and outputs bound at fixed addresses). `stream`: without a graph, ORT works on this torch stream,
    so bound torch tensors need no extra synchronisation. `use_tf32` is off by default, as in PyTorch's own
    matmuls: the CUDA EP's default (on) rounds fp32 graphs' matmul inputs to 10 bits, 2e-4 rel-L2 from eager
    on the H200, and an fp32 export is chosen for fidelity (fp16 graphs are unaffected)."""
    options = {"device_id": str(device_index), "use_tf32": str(int(use_tf32))}
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    elif stream is not None:
        options["user_compute_stream"] = str(stream.cuda_stream)
    return options


def ort_session(onnx_path: Path, device: torch.device, use_tf32: bool = False, stream: torch.cuda.Stream | None = None,
                cuda_graph: bool = False):
    """An InferenceSession on the CUDA execution provider for a CUDA `device` (options from
    `cuda_provider_options`), else on the CPU provider."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT warns about every node it leaves on the CPU; errors still surface
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise MissingDependency(f"ONNX Runtime has no CUDA execution provider here (onnxruntime-gpu): {INSTALL_HINT}")
        cuda = cuda_provider_options(device.index or 0, cuda_graph, use_tf32, stream)
        providers: list[Any] = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        provider = "CUDAExecutionProvider"
    else:
        provider = "CPUExecutionProvider"
        providers = [provider]
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=providers)
    except Exception as err:  # ORT raises its own exception types for invalid graphs and missing kernels
        raise WdmError(f"ONNX Runtime cannot load {Path(onnx_path).name} on {provider}: {first_line(err)}") from None
    # ORT falls back to the CPU provider, with only a log line, when the CUDA provider's libraries fail to load
    if session.get_providers()[0] != provider:
        raise WdmError(f"ONNX Runtime's {provider} did not start for {Path(onnx_path).name} (it fell back to "
                       f"{session.get_providers()[0]}; usually a CUDA or cuDNN library onnxruntime-gpu needs is missing)")
    return session


class OrtRunner:
    """One ONNX Runtime session. On CUDA, inputs and the output are bound to torch tensors in place
    (I/O binding): no host round trip per call.

    `cuda_graph` (CUDA, fixed shapes): ORT captures the run as a CUDA graph and replays it. A graph keeps the
    addresses it was captured with, so the inputs are copied into buffers bound once, and the output buffer
    is cloned. Where ORT cannot capture the graph (a node it keeps on the CPU, as shape arithmetic of a
    dynamic batch is), whether it says so when the session is made or in the first runs, the runner goes on
    without one and `cuda_graph_note` says why."""

    def __init__(self, onnx_path: Path, input_names: Sequence[str], device: torch.device, cuda_graph: bool = False):
        self.onnx_path, self.device = Path(onnx_path), device
        self.input_names = list(input_names)
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self.cuda_graph_note: str | None = None
        self._bound: tuple[Any, list[torch.Tensor], torch.Tensor] | None = None
        self._runs = 0  # runs of the bound graph so far
        if self.cuda_graph:
            try:
                # ORT runs a captured graph on its own stream; __call__ synchronises torch's stream instead
                self.session = ort_session(onnx_path, device, cuda_graph=True)
                return
            except WdmError as err:
                self._without_cuda_graph(err)
                return
        self.session = self._plain_session()

    def describe(self) -> dict[str, Any]:
        """What runs the calls, for the sample's metadata: the providers ORT actually uses and the CUDA graph."""
        return {"providers": list(self.session.get_providers()), "cuda_graph": self.cuda_graph,
                "cuda_graph_note": self.cuda_graph_note}

    def _plain_session(self):
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        return ort_session(self.onnx_path, self.device, stream=stream)

    def _without_cuda_graph(self, err: Exception) -> None:
        self.cuda_graph, self.cuda_graph_note, self._bound = False, f"no CUDA graph: {first_line(err)}", None
        self.session = self._plain_session()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            feeds = {name: t.contiguous().numpy() for name, t in zip(self.input_names, inputs)}
            return torch.from_numpy(self.session.run(None, feeds)[0])
        if self.cuda_graph:
            return self._replay(inputs)
        binding = self.session.io_binding()
        inputs = tuple(t.contiguous() for t in inputs)  # kept alive until the run returns
        out = torch.empty(inputs[0].shape, dtype=torch.float32, device=self.device)
        self._bind(binding, inputs, out)
        self.session.run_with_iobinding(binding)
        return out

    def _bind(self, binding, inputs: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        index = self.device.index or 0
        for name, tensor in zip(self.input_names, inputs):
            binding.bind_input(name, "cuda", index, NUMPY_DTYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        binding.bind_output("eps", "cuda", index, np.float32, tuple(out.shape), out.data_ptr())

    def _replay(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if self._bound is None:
            buffers = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs]
            out = torch.empty(inputs[0].shape, dtype=torch.float32, device=self.device)
            binding = self.session.io_binding()
            self._bind(binding, buffers, out)
            self._bound, self._runs = (binding, buffers, out), 0
        binding, buffers, out = self._bound
        if [tuple(t.shape) for t in inputs] != [tuple(b.shape) for b in buffers]:
            raise WdmError("an ONNX Runtime CUDA graph replays one input shape; this export's batch is fixed")
        for buffer, value in zip(buffers, inputs):
            buffer.copy_(value)
        torch.cuda.current_stream(self.device).synchronize()  # the copies land before ORT's stream reads them
        try:
            self.session.run_with_iobinding(binding)          # returns once ORT's stream is done
        except Exception as err:
            if self._runs >= CAPTURE_RUNS:
                raise
            self._without_cuda_graph(err)  # ORT could not capture (or replay) this graph: run without one
            return self(*inputs)
        self._runs += 1
        return out.clone()


@dataclass
class _EngineSlot:
    """An execution context bound to fixed buffers for one batch size, and its captured CUDA graph."""

    context: Any
    buffers: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None

    def launch(self) -> None:
        """Run on the current stream (a graph replays on it too), after the copies into the buffers."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream)


class TrtRunner:
    """A TensorRT engine with one execution context per batch size, each replayed as a CUDA graph.

    A captured graph bakes in the buffer addresses and shapes, so every batch size gets its own context,
    buffers and graph (a static-batch export has exactly one)."""

    def __init__(self, engine_path: Path, input_names: Sequence[str], sample_shape: Sequence[int],
                 device: torch.device, cuda_graphs: bool = True):
        from wdmctl.export.tensorrt_build import require_tensorrt, torch_dtype

        trt = require_tensorrt()
        self.device, self.cuda_graphs, self.engine_path = device, cuda_graphs, Path(engine_path)
        self.input_names = list(input_names)
        self.sample_shape = tuple(sample_shape)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(device):
            self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise WdmError(f"TensorRT cannot load {engine_path} (built by another TensorRT version or GPU?); "
                           "run `wdmctl export --trt` again")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.dtypes = {name: torch_dtype(trt, self.engine.get_tensor_dtype(name)) for name in names}
        self.slots: dict[int, _EngineSlot] = {}

    def _input_shape(self, name: str, batch: int) -> tuple[int, ...]:
        return (batch, *self.sample_shape) if name == "x" else (batch,)

    def _slot(self, batch: int) -> _EngineSlot:
        if batch in self.slots:
            return self.slots[batch]
        context = self.engine.create_execution_context()
        buffers = {}
        for name in self.input_names:
            shape = self._input_shape(name, batch)
            context.set_input_shape(name, shape)
            buffers[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
        buffers["eps"] = torch.empty(tuple(context.get_tensor_shape("eps")), dtype=self.dtypes["eps"], device=self.device)
        for name, buffer in buffers.items():
            context.set_tensor_address(name, buffer.data_ptr())
        slot = _EngineSlot(context, buffers)
        # one plain run first: TensorRT finishes its lazy, shape-dependent setup outside of the capture
        slot.launch()
        torch.cuda.current_stream(self.device).synchronize()
        if self.cuda_graphs:
            graph = torch.cuda.CUDAGraph()
            # thread_local: TensorRT's own CUDA calls on other threads must not invalidate the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
            slot.graph = graph
        self.slots[batch] = slot
        return slot

    def describe(self) -> dict[str, Any]:
        """What runs the calls, for the sample's metadata."""
        return {"tensorrt": self.engine_path.name, "cuda_graph": self.cuda_graphs}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        slot = self._slot(inputs[0].shape[0])
        for name, value in zip(self.input_names, inputs):
            slot.buffers[name].copy_(value)
        slot.launch()
        return slot.buffers["eps"].clone()  # the buffer is overwritten by the next call


class ExportedDenoiser:
    """`denoise(x, t, y) -> eps` over a runner that accepts batches in [min_batch, max_batch]."""

    def __init__(self, runner: OrtRunner | TrtRunner, manifest: dict, backend: str, device: torch.device):
        self.runner, self.manifest, self.backend, self.device = runner, manifest, backend, device
        self.min_batch, self.max_batch = manifest["batch_range"]
        self.conditional = bool(manifest["conditional"])
        self.null_class = manifest["null_class"]
        self.sample_shape = tuple(manifest["inputs"][0]["shape"][1:])

    def describe(self) -> dict[str, Any]:
        """The backend, the export's scan form and what its runner runs on (recorded next to the samples)."""
        return {"backend": self.backend, "device": str(self.device), "scan_form": self.manifest["scan"]["form"],
                "batch_range": list(self.manifest["batch_range"]), **self.runner.describe()}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            shape = "x".join(map(str, self.sample_shape))
            raise WdmError(f"this export takes {shape} inputs, not {'x'.join(map(str, x.shape[1:]))}; export again "
                           "with --resolution")
        batch = x.shape[0]
        inputs = [x.to(self.device, torch.float32), t.to(self.device, torch.float32).expand(batch)]
        if self.conditional:
            labels = torch.full((batch,), self.null_class, dtype=torch.long) if y is None else y
            inputs.append(labels.to(self.device, torch.long))
        outputs = []
        for start in range(0, batch, self.max_batch):
            part = [v[start:start + self.max_batch] for v in inputs]
            n = part[0].shape[0]
            if n < self.min_batch:  # repeat the last row: real data, so no NaN/inf paths in the padding
                part = [torch.cat([v, v[-1:].expand(self.min_batch - n, *v.shape[1:])]) for v in part]
            outputs.append(self.runner(*part)[:n])
        return torch.cat(outputs).to(x.dtype)


def load_exported_denoiser(export_dir: str | Path, backend: str, device: str | torch.device = "cpu",
                           cuda_graph: bool = True) -> ExportedDenoiser:
    """The exported denoiser in `export_dir` on `backend` ("onnx" or "trt") and `device`, as a callable
    `(x, t, y) -> eps` on torch tensors. "trt" needs an engine built for this GPU (`wdmctl export --trt`).
    `cuda_graph`: on CUDA, replay ONNX Runtime's run of a static-batch export as a CUDA graph."""
    if backend not in BACKENDS:
        raise WdmError(f"exported backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    device = torch.device(device)
    input_names = [spec["name"] for spec in manifest["inputs"]]
    if backend == "onnx":
        require_intact_onnx(export_dir, manifest)
        # a CUDA graph replays fixed shapes: only a static batch (the wrapper pads and splits to it) has them
        cuda_graph = cuda_graph and manifest["batch_range"][0] == manifest["batch_range"][1]
        runner: OrtRunner | TrtRunner = OrtRunner(export_dir / manifest["onnx"]["file"], input_names, device,
                                                  cuda_graph)
    else:
        from wdmctl.export.tensorrt_build import find_engine

        if device.type != "cuda":
            raise WdmError(f"the TensorRT backend runs on a CUDA device, not {device}")
        engine = find_engine(export_dir, manifest, device)
        runner = TrtRunner(engine, input_names, manifest["inputs"][0]["shape"][1:], device)
    return ExportedDenoiser(runner, manifest, backend, device)
