"""The selective scan as one ONNX LinearAttention node per scan (update_rule "gated"): the fast export form.

LinearAttention with update_rule "gated" runs S_t = exp(g_t) * S_{t-1} + k_t v_t^T, o_t = scale * q_t^T S_t
per head, with S of shape (d_k, d_v). Mamba-1's scan h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,
y_t = <C_t, h_t> is that recurrence with

    heads = d_inner, d_k = N, d_v = 1, scale = 1
    query = C_t and key = B_t, the same N-vector for every channel (head)
    value = delta_t * u_t                    (one number per channel)
    decay = delta_t * A                      (per head and key dimension, log-space, <= 0)

Query and key are the same for every head, and the op can say so. onnxruntime's com.microsoft spelling takes
query and key with fewer heads than the state ("inverse GQA": q_num_heads = 1 < kv_num_heads, and a key of one
head shared by all), so they go in as (batch, L, N) instead of d_inner copies of (batch, L, N): two of the
node's three (batch, L, d_inner * N) inputs, and the Expand nodes that built them, are gone ("shared"). ONNX's
standard op requires q_num_heads to be a multiple of kv_num_heads and a key per state head, so with it (and
on a runtime whose contrib kernel refuses the shared shapes) the copies stay ("per-channel").

The D skip, the SiLU(z) gate, softplus and the conv stay ordinary ops (`torch_scan`'s, shared with the
unrolled form), so only the recurrence itself is the special node. The scan interface hands the backend
`reverse` (the inputs are flipped, scanned forwards and the output flipped back) and, since this backend
does not read column order in place, sequences already permuted to column-major order: every token order
the model can ask for exports through the same code.

Two spellings of the op exist, with the same inputs, attributes and semantics:
  "standard"  ONNX's LinearAttention (opset 27); the whole graph is then at opset 27
  "contrib"   onnxruntime's com.microsoft.LinearAttention (domain version 1); the graph keeps opset 20
"auto" takes the standard op where the installed onnxruntime runs it as one kernel on the provider that will
run the graph, else the contrib op where it does, else the standard op as onnxruntime runs it. onnxruntime
1.32.0 (CPU) loads the standard op only by expanding its ONNX function body into a Scan loop (~2x slower
than the contrib kernel there, and control flow rules out CUDA graphs), and runs the contrib op as a
kernel; onnxruntime-gpu 1.31.1 has only the contrib op on CUDA.

During tracing, the op is the custom torch op `wdmctl::gated_linear_attention`. The exporter translates it
to a LinearAttention node in a placeholder domain (no converter can move a node of opset 27 through a
graph of a lower opset), and `place_linear_attention` then moves the nodes to the chosen domain.
"""

from __future__ import annotations

import functools

import torch

from wdmctl.errors import WdmError
from wdmctl.scan import ScanBackend, register_backend
from wdmctl.scan.torch_scan import _finish, _prepare, causal_conv1d_torch

BACKEND = "linear-attention"
OP_TYPE = "LinearAttention"
# --linear-attention choice -> (domain, domain version) of the node
OPS = {"standard": ("", 27), "contrib": ("com.microsoft", 1)}
CHOICES = ("auto", *OPS)
PLACEHOLDER_DOMAIN = "wdmctl.placeholder"
ATTRIBUTES = {"update_rule": "gated", "scale": 1.0}
# --query-key: how the node gets C and B (module docstring); "auto" resolves to one of the other two
QUERY_KEY = ("auto", "shared", "per-channel")
_QUERY_KEY_HEADS = {"shared": "one head that every state head reads, q_num_heads 1", "per-channel": "a copy per channel"}


def mapping(query_key: str) -> str:
    """The scan-to-op mapping in words, for the manifest."""
    return (f"heads = d_inner, d_k = N, d_v = 1; query = C, key = B ({_QUERY_KEY_HEADS[query_key]}), "
            "value = delta * u, decay = delta * A")


@torch.library.custom_op("wdmctl::gated_linear_attention", mutates_args=())
def gated_linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, decay: torch.Tensor,
                           heads: int, query_heads: int) -> torch.Tensor:
    """LinearAttention's "gated" rule with scale 1, token by token (the op's definition; what the exported
    node computes). decay: (batch, L, heads * d_k); value: (batch, L, heads * d_v); query and key: (batch, L,
    query_heads * d_k) with query_heads = heads, or 1 (one query and key shared by every state head)."""
    batch, length, _ = value.shape
    d_k, d_v = decay.shape[-1] // heads, value.shape[-1] // heads
    q, k = (t.float().reshape(batch, length, query_heads, d_k).expand(batch, length, heads, d_k)
            for t in (query, key))
    g = decay.float().reshape(batch, length, heads, d_k)
    v = value.float().reshape(batch, length, heads, d_v)
    state = q.new_zeros(batch, heads, d_k, d_v)
    out = []
    for t in range(length):
        state = torch.exp(g[:, t])[..., None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append((q[:, t, :, :, None] * state).sum(2))
    return torch.stack(out, 1).reshape(batch, length, heads * d_v).to(value.dtype)


@gated_linear_attention.register_fake
def _(query, key, value, decay, heads, query_heads):
    return value.new_empty(value.shape)


def selective_scan_linear_attention(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                    reverse=False, scan_dtype: torch.dtype = torch.float32,
                                    shared_query_key: bool = False, **_):
    """The selective scan with the recurrence as one gated linear attention (mapping in the module docstring).
    Computes in fp32 like the other scans, except that the op's inputs are in `scan_dtype` (fp16 halves the
    traffic of its (batch, L, d_inner * N) decay, and of query and key unless shared); returns u's dtype.
    `shared_query_key`: C and B go in once, as one head that every channel's state reads."""
    out_dtype = u.dtype
    uf, dt, Af, Bf, Cf, z = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    batch, d_inner, length = uf.shape
    n = Af.shape[1]

    def per_head(v):  # (b, N, L) -> (b, L, N) shared, or (b, L, d_inner * N): the same N-vector for every head
        tokens = v.transpose(1, 2)
        if shared_query_key:
            return tokens
        return tokens[:, :, None, :].expand(batch, length, d_inner, n).reshape(batch, length, d_inner * n)

    dt_tokens = dt.transpose(1, 2)                                               # (b, L, d_inner)
    decay = (dt_tokens[..., None] * Af).reshape(batch, length, d_inner * n)      # delta * A, <= 0
    operands = (per_head(Cf), per_head(Bf), dt_tokens * uf.transpose(1, 2), decay)
    query_heads = 1 if shared_query_key else d_inner
    y = gated_linear_attention(*(t.to(scan_dtype) for t in operands), d_inner, query_heads).float()
    return _finish(y.transpose(1, 2), uf, D, z, out_dtype, reverse)


register_backend(ScanBackend(
    name=BACKEND,
    selective_scan=selective_scan_linear_attention,
    causal_conv1d=causal_conv1d_torch,
    is_available=lambda: True,
    install_hint="built in",
    devices=("cpu", "cuda", "meta"),
    priority=-1,   # never `auto`'s choice: its eager form is a per-token loop, it exists to be exported
    exportable=True,
))


# ----------------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _placeholder_op():
    """An onnxscript op for LinearAttention in the placeholder domain, with the opset-27 schema's inputs and
    attributes (onnxscript maps call arguments through a schema)."""
    import onnx
    from onnx.defs import OpSchema
    from onnxscript import values

    std = onnx.defs.get_schema(OP_TYPE, OPS["standard"][1], "")

    def formal(p):
        return OpSchema.FormalParameter(p.name, p.type_str, p.description, param_option=p.option)

    schema = OpSchema(OP_TYPE, PLACEHOLDER_DOMAIN, 1, "", inputs=[formal(p) for p in std.inputs],
                      outputs=[formal(p) for p in std.outputs],
                      type_constraints=[(t.type_param_str, list(t.allowed_type_strs), t.description)
                                        for t in std.type_constraints],
                      attributes=[OpSchema.Attribute(a.name, a.type, a.description, required=a.required)
                                  for a in std.attributes.values()])
    return values.Op(values.Opset(PLACEHOLDER_DOMAIN, 1), OP_TYPE, schema)


def _translate(query, key, value, decay, heads: int, query_heads: int):
    output, _state = _placeholder_op()(query, key, value, None, decay, q_num_heads=query_heads,
                                       kv_num_heads=heads, _outputs=2, **ATTRIBUTES)
    return output


def translation_table() -> dict:
    """For torch.onnx.export(custom_translation_table=...)."""
    return {torch.ops.wdmctl.gated_linear_attention.default: _translate}


def place_linear_attention(model, choice: str) -> int:
    """Move the placeholder nodes of an onnx_ir Model to the domain of `choice` ("standard" | "contrib");
    returns how many there were."""
    domain, version = OPS[choice]
    count = 0
    for node in model.graph.all_nodes():
        if node.domain == PLACEHOLDER_DOMAIN:
            node.domain = domain
            count += 1
    model.opset_imports.pop(PLACEHOLDER_DOMAIN, None)
    if domain:
        model.opset_imports[domain] = version
    elif model.opset_imports.get("", 0) < version:
        raise WdmError(f"the standard {OP_TYPE} needs opset {version}, and the graph is at opset "
                       f"{model.opset_imports.get('')}; pass --opset {version} or --linear-attention contrib")
    return count


def _probe_model(domain: str, version: int, heads: int) -> bytes:
    """One LinearAttention node at the smallest shapes (batch 1, 2 tokens, d_k 2, d_v 1) with `heads` state
    heads reading one query and key head (heads 1: the plain case; 2: the shared query and key)."""
    from onnx import TensorProto, helper

    def io(name, width):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, width])

    node = helper.make_node(OP_TYPE, ["q", "k", "v", "", "g"], ["o", "state"], domain=domain, q_num_heads=1,
                            kv_num_heads=heads, **ATTRIBUTES)
    graph = helper.make_graph([node], "probe", [io("q", 2), io("k", 2), io("v", heads), io("g", 2 * heads)],
                              [io("o", heads)])
    imports = [helper.make_opsetid("", version if not domain else 20)]
    if domain:
        imports.append(helper.make_opsetid(domain, version))
    return helper.make_model(graph, opset_imports=imports, ir_version=10).SerializeToString()


@functools.lru_cache(maxsize=None)
def runtime_support(choice: str, provider: str, shared: bool = False) -> str | None:
    """How the installed onnxruntime runs this spelling of the op on `provider`, judged by loading and running
    a one-node graph (without falling back to the CPU provider) and reading back the graph it optimised:
    "kernel" (the node is still there), "function" (ORT expanded the op's ONNX function body, a Scan loop),
    or None (it cannot run it, or got it wrong). `shared`: two state heads reading one query and key head."""
    import tempfile
    from pathlib import Path

    import numpy as np
    import onnx

    from wdmctl.export.runtime import import_onnxruntime

    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if provider != "CPUExecutionProvider":
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    heads = 2 if shared else 1
    feeds = {"q": np.ones((1, 2, 2), np.float32), "k": np.ones((1, 2, 2), np.float32),
             "v": np.ones((1, 2, heads), np.float32), "g": np.zeros((1, 2, 2 * heads), np.float32)}
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        try:
            session = ort.InferenceSession(_probe_model(*OPS[choice], heads), options, providers=[provider])
            out = session.run(None, feeds)[0]
            nodes = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
        except Exception:  # ORT raises its own types for unknown ops and missing kernels
            return None
    if not np.allclose(out, np.repeat([[[2.0], [4.0]]], heads, -1)):  # every head's q.S: 2, then 2 + 2 (exp(0) = 1)
        return None
    # (on CUDA the optimised graph also holds the copies from and to the host around the node)
    return "kernel" if OP_TYPE in nodes else "function"


def resolve_choice(choice: str, provider: str, opset: int | None) -> str:
    """"standard" or "contrib" for --linear-attention `choice`, for graphs run on `provider` (the order in
    the module docstring)."""
    if choice not in CHOICES:
        raise WdmError(f"--linear-attention must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice != "auto":
        return choice
    standard = runtime_support("standard", provider) if opset is None or opset >= OPS["standard"][1] else None
    contrib = runtime_support("contrib", provider)
    if standard == "kernel" or (standard and contrib != "kernel"):
        return "standard"
    if contrib:
        return "contrib"
    from wdmctl.export.manifest import onnxruntime_version

    raise WdmError(f"onnxruntime {onnxruntime_version()} runs neither the standard nor the com.microsoft "
                   f"{OP_TYPE} on {provider}; upgrade onnxruntime, or export with --scan-form unrolled")


def resolve_query_key(query_key: str, choice: str, provider: str) -> str:
    """"shared" or "per-channel" for --query-key `query_key`, with the op spelling `choice` (resolved) run on
    `provider`: "auto" shares where the contrib kernel takes the shared shapes there."""
    if query_key not in QUERY_KEY:
        raise WdmError(f"--query-key must be one of {', '.join(QUERY_KEY)}, not {query_key!r}")
    if query_key == "shared" and choice != "contrib":
        raise WdmError("--query-key shared needs --linear-attention contrib: the standard LinearAttention "
                       "takes a query and a key per state head")
    if query_key != "auto":
        return query_key
    return "shared" if choice == "contrib" and runtime_support(choice, provider, shared=True) == "kernel" \
        else "per-channel"
