"""`wdmctl export`: ONNX graphs of tiny models checked and run on ONNX Runtime CPU against PyTorch, the
manifest, atomic writes, one-line errors, the exported denoiser in sampling, and the TensorRT pieces that
need no TensorRT (profile shapes, cache keys, engine lookup).

Tolerances (ONNX Runtime vs the fp32 PyTorch model, eps ~ N(0, 1)), from wdmctl.export.verify:
  fp32: max-abs 1e-3, rel-L2 1e-4   (measured on these models: ~2e-7 max-abs, ~6e-7 rel-L2)
  fp16: max-abs 5e-2, rel-L2 1e-2   (measured: ~2e-4 max-abs, ~5e-4 rel-L2)
Tracing is the slow part (dynamic shapes several times slower than static), so the three dynamo exports
are module fixtures shared by the tests, and the failure-injection tests replay an already traced graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from wdmctl.cli import main  # noqa: E402
from wdmctl.errors import MissingDependency, WdmError  # noqa: E402
from wdmctl.export import onnx_export, tensorrt_build  # noqa: E402
from wdmctl.export.manifest import MANIFEST_FILE, ONNX_FILE, read_manifest, sha256_file  # noqa: E402
from wdmctl.export.onnx_export import ExportSettings, ensure_onnx, export_onnx, source_identity  # noqa: E402
from wdmctl.export.runtime import load_exported_denoiser  # noqa: E402
from wdmctl.export.verify import TOLERANCES, Tolerances  # noqa: E402
from wdmctl.models.presets import build_model  # noqa: E402

TINY = dict(width=32, depth=1, sample_size=8, in_channels=4)
NUM_CLASSES = 10
QUIET = lambda line: None  # noqa: E731


def tiny_model(num_classes: int):
    torch.manual_seed(0)
    return build_model("WDM-S/2", **TINY, num_classes=num_classes).eval()


def torch_eps(model, scan: str, x, t, y=None, chunk_size: int = 16):
    """The fp32 PyTorch model on the same scan form as an export."""
    model.set_scan_backend(*(("torch",) if scan == "chunked" else ("torch-sequential",)), **(
        {"chunk_size": chunk_size} if scan == "chunked" else {}))
    with torch.no_grad():
        return model(x, t, y)


def inputs(batch: int, conditional: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.rand(batch, generator=g) * 999
    y = torch.randint(0, NUM_CLASSES + 1, (batch,), generator=g) if conditional else None
    return x, t, y


def load_graph(folder: Path) -> onnx.ModelProto:
    return onnx.load(str(folder / ONNX_FILE))


def graph_ops(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


# ----------------------------------------------------------------------------------------------------
# Exports shared by the tests (each is minutes of tracing work on slow machines)
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_conditional(tmp_path_factory):
    """A tiny conditional model saved as a wdmctl model folder (as a training checkpoint would be)."""
    from wdmctl.diffusion import make_noise_scheduler
    from wdmctl.pipeline import save_pipeline

    folder = tmp_path_factory.mktemp("ckpt") / "pipeline"
    save_pipeline(folder, tiny_model(NUM_CLASSES), make_noise_scheduler(), {"step": 7})
    return folder


@pytest.fixture(scope="module")
def conditional_export(saved_conditional):
    """Through the CLI: chunked scan (chunks of 8 over 18 tokens: 8 + 8 + 2), fp32, guidance batch 2 x 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(saved_conditional), "--batch-size", "2", "--chunk-size", "8"])
    assert exit_info.value.code == 0
    return saved_conditional.parent / "export"


@pytest.fixture(scope="module")
def unconditional_export(tmp_path_factory):
    """Through the API: sequential scan (17 unrolled steps per block), fp32, batch 3."""
    out = tmp_path_factory.mktemp("uncond")
    settings = ExportSettings(batch_size=3, scan="sequential")
    export_onnx(tiny_model(0), out, settings, {"weights_sha256": "uncond", "ema": True}, log=QUIET)
    return out


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory):
    """fp16 with a dynamic batch (1..4), one chunk per scan (dynamic shapes make tracing several times
    slower, so this graph is the smallest)."""
    out = tmp_path_factory.mktemp("fp16")
    settings = ExportSettings(batch_size=2, dtype="fp16", chunk_size=32, dynamic_batch=True)
    export_onnx(tiny_model(NUM_CLASSES), out, settings, {"weights_sha256": "fp16", "ema": True}, log=QUIET)
    return out


# ----------------------------------------------------------------------------------------------------
# The graphs
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["conditional_export", "unconditional_export", "fp16_export"])
def test_graphs_are_plain_standard_onnx(which, request):
    folder = request.getfixturevalue(which)
    onnx.checker.check_model(str(folder / ONNX_FILE), full_check=True)
    graph = load_graph(folder)
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}
    assert not graph_ops(graph) & {"Loop", "Scan", "If", "SequenceMap"}
    assert not graph.functions
    assert [(o.domain, o.version) for o in graph.opset_import] == [("", 20)]


def test_scan_forms_are_unrolled_in_the_graph(conditional_export, unconditional_export):
    # chunked: a cumulative sum of log-decays per chunk (3 chunks x 6 blocks); sequential: the decays of all
    # tokens in one Exp per block, then one Mul + Add per token after the first (17 tokens: time + 16 patches)
    chunked, sequential = load_graph(conditional_export), load_graph(unconditional_export)
    ops = ("CumSum", "Exp", "Add", "ScatterElements", "Loop", "Scan")
    histogram = lambda g: {op: sum(n.op_type == op for n in g.graph.node) for op in ops}  # noqa: E731
    assert histogram(chunked)["CumSum"] == 3 * 6
    seq = histogram(sequential)
    assert seq["CumSum"] == seq["ScatterElements"] == seq["Loop"] == seq["Scan"] == 0
    assert seq["Exp"] == 6 and seq["Add"] >= 16 * 6


def test_conditional_io_is_the_guidance_batch(conditional_export):
    graph = load_graph(conditional_export)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert shapes == {"x": [4, 4, 8, 8], "timesteps": [4], "class_labels": [4]}
    types = {i.name: i.type.tensor_type.elem_type for i in graph.graph.input}
    assert types == {"x": onnx.TensorProto.FLOAT, "timesteps": onnx.TensorProto.FLOAT,
                     "class_labels": onnx.TensorProto.INT64}
    assert [o.name for o in graph.graph.output] == ["eps"]


def test_fp16_graph_keeps_fp32_islands(fp16_export):
    graph = onnx.shape_inference.infer_shapes(load_graph(fp16_export))
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*graph.graph.value_info, *graph.graph.input, *graph.graph.output]}
    types.update({init.name: init.data_type for init in graph.graph.initializer})

    def input_types(op):
        return {types.get(n.input[0]) for n in graph.graph.node if n.op_type == op}

    # the projections run in fp16 ...
    assert input_types("MatMul") == {onnx.TensorProto.FLOAT16}
    # ... softplus, the scan's decays and cumulative sums, and RMSNorm's mean square in fp32
    for op in ("Softplus", "CumSum", "Exp", "ReduceMean", "Sqrt"):
        assert input_types(op) == {onnx.TensorProto.FLOAT}, op


# ----------------------------------------------------------------------------------------------------
# Verification and the manifest
# ----------------------------------------------------------------------------------------------------

def test_manifest_of_the_cli_export(conditional_export, saved_conditional):
    m = read_manifest(conditional_export)
    assert m["onnx"]["sha256"] == sha256_file(conditional_export / ONNX_FILE)
    assert m["onnx"]["exporter"] == "dynamo" and m["onnx"]["exporter_note"] is None
    assert m["onnx"]["opset"] == 20 and m["onnx"]["external_data"] is None
    assert m["onnx"]["external_data_sha256"] is None and len(m["onnx"]["content_sha256"]) == 64
    graph = load_graph(conditional_export)
    assert m["onnx"]["node_count"] == len(graph.graph.node) == sum(m["onnx"]["op_histogram"].values())
    assert m["onnx"]["export_seconds"] > 0
    assert m["settings"] == {"batch_size": 2, "resolution": 8, "dtype": "fp32", "scan": "chunked", "chunk_size": 8,
                             "opset": 20, "dynamic_batch": False}
    assert (m["conditional"], m["num_classes"], m["null_class"], m["batch_range"]) == (True, 10, 10, [4, 4])
    assert [(i["name"], i["shape"], i["dtype"]) for i in m["inputs"]] == [
        ("x", [4, 4, 8, 8], "float32"), ("timesteps", [4], "float32"), ("class_labels", [4], "int64")]
    assert m["source"] == source_identity(saved_conditional, True, {"step": 7})
    assert m["source"]["step"] == 7
    v = m["verification"]
    assert v["passed"] and v["provider"] == "CPUExecutionProvider"
    assert v["tolerances"] == {"max_abs": 1e-3, "rel_l2": 1e-4}
    assert [c["timestep"] for c in v["cases"]] == [0, 250, 500, 750, 999]
    assert v["max_abs"] < 1e-5 and v["rel_l2"] < 1e-5
    assert {"torch", "onnx", "onnxscript", "onnxruntime", "wdmctl"} <= set(m["versions"])
    assert m["tensorrt"] == {"engines": []}


def test_unconditional_manifest(unconditional_export):
    m = read_manifest(unconditional_export)
    assert not m["conditional"] and m["null_class"] is None
    assert [(i["name"], i["shape"]) for i in m["inputs"]] == [("x", [3, 4, 8, 8]), ("timesteps", [3])]
    assert m["batch_range"] == [3, 3]
    assert m["settings"]["scan"] == "sequential" and m["settings"]["chunk_size"] == 1
    assert m["verification"]["passed"] and m["verification"]["rel_l2"] < 1e-5


def test_fp16_dynamic_manifest_and_looser_tolerance(fp16_export):
    m = read_manifest(fp16_export)
    assert m["inputs"][0]["shape"] == ["batch", 4, 8, 8] and m["batch_range"] == [1, 4]
    assert m["settings"]["dtype"] == "fp16" and m["precision"]["graph"] == "fp16"
    graph = load_graph(fp16_export)
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    v = m["verification"]
    assert sorted({c["batch"] for c in v["cases"]}) == [1, 4]
    assert v["passed"] and v["tolerances"] == {"max_abs": 5e-2, "rel_l2": 1e-2}
    assert 1e-5 < v["rel_l2"] < TOLERANCES["fp16"].rel_l2  # really half precision, within its tolerance
    # really half precision: clearly above fp32 noise, well inside the fp16 tolerance
    assert 1e-5 < v["rel_l2"] < TOLERANCES["fp16"].rel_l2


# ----------------------------------------------------------------------------------------------------
# The runtime wrapper: what `wdmctl sample --backend onnx` calls
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3, 4, 9])  # pad to 4; exactly 4; split into 4 + 4 + 1
def test_exported_denoiser_matches_torch_any_batch(conditional_export, batch):
    denoise = load_exported_denoiser(conditional_export, "onnx", "cpu")
    x, t, y = inputs(batch, conditional=True)
    expected = torch_eps(tiny_model(NUM_CLASSES), "chunked", x, t, y, chunk_size=8)
    torch.testing.assert_close(denoise(x, t, y), expected, atol=1e-4, rtol=1e-4)


def test_exported_denoiser_fills_null_labels_and_scalar_time(conditional_export):
    denoise = load_exported_denoiser(conditional_export, "onnx", "cpu")
    x, _, _ = inputs(2, conditional=True)
    t = torch.tensor(500.0)
    expected = torch_eps(tiny_model(NUM_CLASSES), "chunked", x, t.expand(2), torch.full((2,), NUM_CLASSES),
                         chunk_size=8)
    torch.testing.assert_close(denoise(x, t, None), expected, atol=1e-4, rtol=1e-4)


def test_unconditional_denoiser(unconditional_export):
    denoise = load_exported_denoiser(unconditional_export, "onnx", "cpu")
    x, t, _ = inputs(5, conditional=False)  # 3, then 2 padded to 3
    expected = torch_eps(tiny_model(0), "sequential", x, t)
    torch.testing.assert_close(denoise(x, t), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch", [3, 6])  # any batch up to 4 as it is; 6 = 4 + 2
def test_fp16_dynamic_denoiser_within_tolerance(fp16_export, batch):
    denoise = load_exported_denoiser(fp16_export, "onnx", "cpu")
    x, t, y = inputs(batch, conditional=True)
    expected = torch_eps(tiny_model(NUM_CLASSES), "chunked", x, t, y, chunk_size=32)
    err = (denoise(x, t, y) - expected).norm() / expected.norm()
    assert err < TOLERANCES["fp16"].rel_l2


def test_wrong_input_size_is_a_one_line_error(conditional_export):
    denoise = load_exported_denoiser(conditional_export, "onnx", "cpu")
    with pytest.raises(WdmError, match="takes 4x8x8 inputs"):
        denoise(torch.zeros(4, 4, 16, 16), torch.zeros(4), None)


def test_sampling_through_onnx_matches_torch(conditional_export):
    from wdmctl.diffusion import make_noise_scheduler
    from wdmctl.diffusion.sampler import sample_images

    model = tiny_model(NUM_CLASSES)
    model.set_scan_backend("torch", chunk_size=8)
    common = dict(seeds=[0, 1, 2], labels=[1, 2, 3], steps=4, cfg=1.5, batch_size=3)
    config = dict(make_noise_scheduler().config)
    reference = sample_images(model, config, None, **common).astype(np.float64)
    onnx_images = sample_images(model, config, None, denoiser=load_exported_denoiser(conditional_export, "onnx"),
                                **common).astype(np.float64)
    mse = np.mean((reference - onnx_images) ** 2)
    psnr = 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))
    assert psnr > 50, psnr


# ----------------------------------------------------------------------------------------------------
# Reuse, atomic writes, the exporter fallback
# ----------------------------------------------------------------------------------------------------

def test_second_export_needs_overwrite(conditional_export, saved_conditional, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(saved_conditional), "--batch-size", "2", "--chunk-size", "8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "already holds an export; pass --overwrite" in err and "\n" not in err


def test_ensure_onnx_reuses_a_matching_export(conditional_export, saved_conditional, monkeypatch):
    from wdmctl.pipeline import load_pipeline

    pipe = load_pipeline(saved_conditional)
    source = source_identity(saved_conditional, True, pipe.meta)
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    same = ExportSettings(batch_size=2, chunk_size=8)
    assert ensure_onnx(pipe.model, conditional_export, same, source, log=QUIET) == read_manifest(conditional_export)
    with pytest.raises(WdmError, match="other batch_size, dtype; pass --overwrite"):
        ensure_onnx(pipe.model, conditional_export, ExportSettings(batch_size=3, dtype="fp16", chunk_size=8), source)
    with pytest.raises(WdmError, match="other source weights_sha256"):
        ensure_onnx(pipe.model, conditional_export, same, {**source, "weights_sha256": "other"})


@pytest.fixture
def replay_traced_graph(conditional_export, monkeypatch):
    """Skip the (slow) tracing: `trace_to_onnx` returns the conditional export's graph, so writing,
    checking, verifying and renaming run for real."""
    import onnx_ir

    monkeypatch.setattr(onnx_export, "trace_to_onnx",
                        lambda *a, **k: (onnx_ir.load(conditional_export / ONNX_FILE), "dynamo", None))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failed_verification_writes_nothing(replay_traced_graph, tmp_path):
    settings = ExportSettings(batch_size=2, chunk_size=8)
    with pytest.raises(WdmError, match="verification failed: .*nothing was written"):
        export_onnx(tiny_model(NUM_CLASSES), tmp_path, settings, {}, tolerances=Tolerances(0.0, 0.0), log=QUIET)
    assert _files(tmp_path) == []  # no .onnx, no manifest, no staging folder


def test_failed_overwrite_keeps_the_previous_export(replay_traced_graph, tmp_path):
    settings = ExportSettings(batch_size=2, chunk_size=8)
    first = export_onnx(tiny_model(NUM_CLASSES), tmp_path, settings, {"weights_sha256": "a"}, log=QUIET)
    with pytest.raises(WdmError, match="verification failed"):
        export_onnx(tiny_model(NUM_CLASSES), tmp_path, settings, {"weights_sha256": "b"}, overwrite=True,
                    tolerances=Tolerances(0.0, 0.0), log=QUIET)
    assert _files(tmp_path) == sorted([MANIFEST_FILE, ONNX_FILE])
    assert read_manifest(tmp_path) == first
    assert sha256_file(tmp_path / ONNX_FILE) == first["onnx"]["sha256"]


def test_interrupted_write_leaves_no_final_file(replay_traced_graph, tmp_path, monkeypatch):
    import onnx_ir

    def half_write(model, path, **kwargs):
        Path(path).write_bytes(b"\x08\x07half a protobuf")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_ir, "save", half_write)
    with pytest.raises(WdmError, match="cannot write denoiser.onnx: No space left on device"):
        export_onnx(tiny_model(NUM_CLASSES), tmp_path, ExportSettings(batch_size=2, chunk_size=8), {}, log=QUIET)
    assert _files(tmp_path) == []


def test_large_weights_go_to_external_data(replay_traced_graph, tmp_path, monkeypatch):
    settings = ExportSettings(batch_size=2, chunk_size=8)
    inline_limit = onnx_export.EXTERNAL_DATA_BYTES
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # as if the weights passed 1.5 GiB
    m = export_onnx(tiny_model(NUM_CLASSES), tmp_path, settings, {}, log=QUIET)
    assert _files(tmp_path) == sorted([MANIFEST_FILE, ONNX_FILE, "denoiser.onnx.data"])
    assert m["onnx"]["external_data"] == "denoiser.onnx.data"
    assert m["onnx"]["external_data_sha256"] == sha256_file(tmp_path / "denoiser.onnx.data")
    assert m["verification"]["passed"]
    x, t, y = inputs(4, conditional=True)
    expected = torch_eps(tiny_model(NUM_CLASSES), "chunked", x, t, y, chunk_size=8)
    torch.testing.assert_close(load_exported_denoiser(tmp_path, "onnx")(x, t, y), expected, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", inline_limit)  # inline again: the stale data file goes
    replaced = export_onnx(tiny_model(NUM_CLASSES), tmp_path, settings, {}, overwrite=True, log=QUIET)
    assert _files(tmp_path) == sorted([MANIFEST_FILE, ONNX_FILE])
    assert replaced["onnx"]["content_sha256"] != m["onnx"]["content_sha256"]


def test_torchscript_fallback_is_noted_and_verified(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo cannot\nsecond line")

    monkeypatch.setattr(onnx_export, "_dynamo_export", broken)
    settings = ExportSettings(batch_size=2, chunk_size=32)
    m = export_onnx(tiny_model(0), tmp_path, settings, {}, log=QUIET)
    assert m["onnx"]["exporter"] == "torchscript"
    assert "dynamo exporter failed (dynamo cannot)" in m["onnx"]["exporter_note"]
    assert m["verification"]["passed"] and m["verification"]["rel_l2"] < 1e-5
    graph = load_graph(tmp_path)
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"} and "Loop" not in graph_ops(graph)


def test_no_torchscript_fallback_above_opset_20(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "_dynamo_export", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(WdmError, match="TorchScript fallback stops at opset 20"):
        export_onnx(tiny_model(0), tmp_path, ExportSettings(opset=21), {}, log=QUIET)
    assert _files(tmp_path) == []


# ----------------------------------------------------------------------------------------------------
# One-line errors
# ----------------------------------------------------------------------------------------------------

def one_line_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--opset", "17"], "--opset 17 is too low for a fp32 export: 18 or higher"),
    (["--dtype", "bf16"], "--opset 20 is too low for a bf16 export: 22 or higher (bfloat16 Conv"),
    (["--opset", "99"], "--opset 99 is newer than the installed onnx"),
    (["--scan", "parallel"], "--scan must be one of chunked, sequential"),
    (["--dtype", "int8"], "--dtype must be one of fp32, fp16, bf16"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--resolution", "7"], "--resolution 7 is not a multiple of the patch size 2"),
])
def test_bad_settings(saved_conditional, tmp_path, capsys, extra, message):
    err = one_line_error(["export", "--model", str(saved_conditional), "--out", str(tmp_path / "x"), *extra], capsys)
    assert message in err


def test_missing_model_folder(tmp_path, capsys):
    assert "not a wdmctl model folder" in one_line_error(["export", "--model", str(tmp_path / "nope")], capsys)


def test_missing_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(["export", "--run", str(tmp_path / "runs" / "nope")], capsys)
    assert "nope" in err


def test_unwritable_out_dir(saved_conditional, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    err = one_line_error(["export", "--model", str(saved_conditional), "--out", str(blocker / "export")], capsys)
    assert f"cannot write to {blocker / 'export'}" in err


def test_model_without_exportable_scan_path(monkeypatch):
    from wdmctl.scan import BACKENDS, resolve_backend

    with pytest.raises(WdmError, match="Linear has no exportable scan path"):
        onnx_export.prepare_for_export(torch.nn.Linear(2, 2), "fp32", "chunked", 16)
    resolve_backend("torch", "cpu")  # registers the built-in backends
    monkeypatch.setattr(BACKENDS["torch"], "exportable", False)
    with pytest.raises(WdmError, match="no exportable scan path"):
        onnx_export.prepare_for_export(tiny_model(0), "fp32", "chunked", 16)


# ----------------------------------------------------------------------------------------------------
# TensorRT: everything that runs without TensorRT
# ----------------------------------------------------------------------------------------------------

def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT is installed here")
def test_trt_without_tensorrt_is_one_line(saved_conditional, tmp_path, capsys):
    err = one_line_error(["export", "--trt", "--model", str(saved_conditional), "--out", str(tmp_path)], capsys)
    assert err == 'error: TensorRT is not installed: pip install "wdmctl[export]"'
    assert _files(tmp_path) == []  # refused before any export work
    with pytest.raises(MissingDependency, match=r'pip install "wdmctl\[export\]"'):
        tensorrt_build.build_engine(tmp_path)


def test_trt_backend_needs_cuda(conditional_export):
    with pytest.raises(WdmError, match="TensorRT backend runs on a CUDA device, not cpu"):
        load_exported_denoiser(conditional_export, "trt", "cpu")
    with pytest.raises(WdmError, match="must be one of onnx, trt"):
        load_exported_denoiser(conditional_export, "tflite", "cpu")


def test_profile_shapes_static_and_dynamic(conditional_export, unconditional_export, fp16_export):
    assert tensorrt_build.profile_shapes(read_manifest(conditional_export)) == {
        "x": [[4, 4, 8, 8]] * 3, "timesteps": [[4]] * 3, "class_labels": [[4]] * 3}
    assert tensorrt_build.profile_shapes(read_manifest(unconditional_export)) == {
        "x": [[3, 4, 8, 8]] * 3, "timesteps": [[3]] * 3}
    assert tensorrt_build.profile_shapes(read_manifest(fp16_export)) == {
        "x": [[1, 4, 8, 8], [4, 4, 8, 8], [4, 4, 8, 8]], "timesteps": [[1], [4], [4]],
        "class_labels": [[1], [4], [4]]}


H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_engine_cache_key_changes_with_everything_it_depends_on(conditional_export):
    profile = tensorrt_build.profile_shapes(read_manifest(conditional_export))
    args = ("a" * 64, "10.16.1.11", H100, profile, 3)
    key = tensorrt_build.engine_cache_key(*args)
    assert key == tensorrt_build.engine_cache_key(*args) and len(key) == 24
    variants = [("b" * 64, *args[1:]), (args[0], "11.4.0.106", *args[2:]),
                (*args[:2], {**H100, "name": "NVIDIA H200"}, *args[3:]),
                (*args[:2], {**H100, "compute_capability": "8.0"}, *args[3:]),
                (*args[:3], {**profile, "x": [[1, 4, 8, 8], [4, 4, 8, 8], [4, 4, 8, 8]]}, 3),
                (*args[:4], 5)]
    keys = {tensorrt_build.engine_cache_key(*v) for v in variants}
    assert len(keys) == len(variants) and key not in keys


def test_timing_cache_name_and_engine_entry():
    assert tensorrt_build.timing_cache_name(H100, "10.16.1.11") == "timing-nvidia-h100-80gb-hbm3-sm90-trt10.16.1.11.cache"
    entry = tensorrt_build.engine_entry("k" * 24, "engines/k.plan", "s" * 64, 123, "10.16.1.11", H100,
                                        {"x": [[4, 4, 8, 8]] * 3}, 3, 12.345, "engines/t.cache")
    assert entry == {"key": "k" * 24, "file": "engines/k.plan", "sha256": "s" * 64, "bytes": 123,
                     "tensorrt": "10.16.1.11", "gpu": H100["name"], "compute_capability": "9.0",
                     "profile": {"x": [[4, 4, 8, 8]] * 3}, "optimization_level": 3, "build_seconds": 12.35,
                     "timing_cache": "engines/t.cache", "strongly_typed": True}


def test_find_engine_matches_gpu_and_tensorrt_version(tmp_path, monkeypatch):
    class FakeTensorRT:
        __version__ = "10.16.1.11"

    monkeypatch.setattr(tensorrt_build, "require_tensorrt", lambda: FakeTensorRT)
    monkeypatch.setattr(tensorrt_build, "gpu_identity", lambda device: H100)
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "h100.plan").write_bytes(b"engine")
    entry = tensorrt_build.engine_entry("h100", "engines/h100.plan", "", 6, "10.16.1.11", H100, {}, 3, 1.0, "")
    other = {**entry, "file": "engines/a100.plan", "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    manifest = {"tensorrt": {"engines": [entry, other]}}
    assert tensorrt_build.find_engine(tmp_path, manifest, torch.device("cuda")) == tmp_path / "engines" / "h100.plan"
    with pytest.raises(WdmError, match="no TensorRT 10.16.1.11 engine for NVIDIA H100 80GB HBM3; run `wdmctl export --trt"):
        tensorrt_build.find_engine(tmp_path, {"tensorrt": {"engines": [other]}}, torch.device("cuda"))
    stale = {"tensorrt": {"engines": [{**entry, "tensorrt": "10.9.0.34"}]}}
    with pytest.raises(WdmError, match="no TensorRT"):
        tensorrt_build.find_engine(tmp_path, stale, torch.device("cuda"))


# ----------------------------------------------------------------------------------------------------
# bench denoiser (CPU: PyTorch eager and ONNX Runtime on the existing export; TensorRT reported as skipped)
# ----------------------------------------------------------------------------------------------------

def test_bench_model_reuses_the_export_and_reports_each_backend(conditional_export, saved_conditional):
    from wdmctl.export.benchmark import DenoiserBench, bench_model
    from wdmctl.pipeline import load_pipeline

    pipe = load_pipeline(saved_conditional)
    bench = DenoiserBench(batch_size=2, dtype="fp32", chunk_size=8, steps=2, warmup=0, iters=1,
                          backends=["eager", "onnxruntime", "tensorrt"])
    before = sha256_file(conditional_export / MANIFEST_FILE)
    result = bench_model("tiny", pipe.model, source_identity(saved_conditional, True, pipe.meta), bench,
                         torch.device("cpu"), conditional_export)
    assert sha256_file(conditional_export / MANIFEST_FILE) == before  # reused, not exported again
    assert result["graph_batch"] == 4 and result["onnx"]["node_count"] > 0
    for backend in ("eager", "onnxruntime"):
        timing = result["backends"][backend]
        assert timing["latency_ms"] > 0 and timing["sampling_s"] > 0, backend
    if not _has_tensorrt():
        assert "pip install" in result["backends"]["tensorrt"]["skipped"]
    json.dumps(result)


def test_bench_rejects_unknown_backends():
    from wdmctl.export.benchmark import DenoiserBench, run_denoiser_bench

    with pytest.raises(WdmError, match="unknown backend"):
        run_denoiser_bench(DenoiserBench(presets=["WDM-B/2"], backends=["tvm"]))


# ----------------------------------------------------------------------------------------------------
# GPU (H100, with onnxruntime-gpu; TensorRT where installed)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_onnxruntime_cuda_parity(conditional_export):
    ort = pytest.importorskip("onnxruntime")
    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA device and onnxruntime-gpu")
    from wdmctl.export.verify import exact_fp32

    denoise = load_exported_denoiser(conditional_export, "onnx", "cuda")
    model = tiny_model(NUM_CLASSES).cuda()
    for batch in (4, 3):
        x, t, y = (v.cuda() for v in inputs(batch, conditional=True))
        with exact_fp32():
            expected = torch_eps(model, "chunked", x, t, y, chunk_size=8)
        out = denoise(x, t, y)
        assert out.device.type == "cuda"
        torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_tensorrt_engine_parity_and_cache(conditional_export):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    entry = tensorrt_build.build_engine(conditional_export, log=QUIET)
    assert tensorrt_build.build_engine(conditional_export, log=QUIET) == entry  # cached
    denoise = load_exported_denoiser(conditional_export, "trt", "cuda")
    model = tiny_model(NUM_CLASSES).cuda()
    x, t, y = (v.cuda() for v in inputs(4, conditional=True))
    expected = torch_eps(model, "chunked", x, t, y, chunk_size=8)
    for _ in range(2):  # capture, then replay
        torch.testing.assert_close(denoise(x, t, y), expected, atol=2e-3, rtol=2e-3)
