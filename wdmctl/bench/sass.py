"""`wdmctl bench sass`: what one scan step costs the triton kernels, read from their Hopper machine code, and the
floor that puts under their time. It needs no GPU: it runs anywhere Triton is installed.

How. The triton backend's own host code runs at the asked shape on meta tensors (shapes and strides, no data),
forward and backward. Every kernel launch it makes is caught before it would reach a GPU and compiled for
sm_90 (the H100's and H200's architecture) the way Triton's launcher compiles it: the same specialisation of
the arguments (16-byte alignment of pointers, divisibility of integers), constexprs and options, at the launch
configuration a GPU's tuner chose (`--measured`, a `bench scan` JSON) or one given. nvdisasm, which comes with
Triton, disassembles the cubin; the innermost loop of each kernel is its loop over scan steps, and its
instructions, counted by opcode, are what one step costs one warp (32 channels).

The floor. A Hopper SM has 4 schedulers, each issuing at most one warp instruction per clock, and 16 lanes of
MUFU (ex2, lg2, rcp) per clock (CUDA C++ Programming Guide, arithmetic instruction throughput, compute
capability 9.0): a MUFU warp instruction holds a scheduler's unit for 8 clocks. A step therefore costs a
scheduler at least max(instructions, 8 x MUFU) clocks; a kernel's time is at least that over all its warps'
steps on the scheduler given the most warps: a warp never leaves its scheduler, so some scheduler holds at least
warps / schedulers of them, rounded up. The floor assumes every latency hidden, so the measured time over it
says how much is latency, and the floor itself is what no scheduling can beat without fewer instructions per
step or more warps.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from wdmctl.errors import WdmError

# Hopper, per SM (CUDA C++ Programming Guide, "Arithmetic Instructions", compute capability 9.0)
SCHEDULERS_PER_SM = 4         # each issues one warp instruction per clock
MUFU_LANES_PER_SM = 16        # ex2, lg2, rcp, rsqrt, sin, cos results per clock
WARP = 32
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_PROGRAMS_PER_SM = 32      # resident thread blocks
MUFU_CLOCKS = WARP // (MUFU_LANES_PER_SM // SCHEDULERS_PER_SM)   # one MUFU warp instruction: 8 clocks
# The GPUs a measured JSON can name: multiprocessors and SM clock. The H200's were read on the device machine
# here (PyTorch's 132 multiprocessors, nvidia-smi's 1,980 MHz under load: /work/.library/device/KINDS.md);
# the H100 SXM's are its specification. The highest clock gives the lowest, most generous floor.
GPUS = {"NVIDIA H200": (132, 1.98e9), "NVIDIA H100 80GB HBM3": (132, 1.98e9)}

# The plain triton backend's kernels, in launch order, and the tuner's name for each (launch._choose's kind).
KERNEL_KINDS = {"_scan_fwd_kernel": "fwd", "_scan_bwd1_kernel": "bwd1", "_scan_bwd2_kernel": "bwd2"}
# What the H200's tuner chose at WDM-B/2's 256- and 1,024-token shapes (benchmarks/h200-issue16-scan-model-
# shapes.json): the configs used when no --measured run names them.
DEFAULT_CONFIGS = {"fwd": (32, 1), "bwd1": (32, 1, 168), "bwd2": (32, 1, 168)}

# Opcode classes for the report (SASS opcodes without their modifiers)
CLASSES = {
    "fp32": {"FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FCHK", "FSWZADD"},
    "mufu": {"MUFU"},
    "load": {"LDG", "LDS", "LDC", "LD", "LDL", "ULDC"},
    "store": {"STG", "STS", "ST", "STL"},
    "shuffle": {"SHFL"},
    "convert": {"F2F", "F2FP", "I2F", "I2FP", "F2I", "F2IP", "PRMT", "HADD2", "HFMA2", "HMUL2"},
    "control": {"BRA", "EXIT", "BAR", "BSSY", "BSYNC", "WARPSYNC", "NOP", "YIELD"},
}


@dataclass
class KernelBuild:
    """One caught launch, compiled: the kernel's name, launch config, grid and its cubin's path."""
    name: str
    config: tuple
    grid: tuple
    warps: int
    cubin: Path


def _opcode(instruction: str) -> str:
    """The opcode of one SASS instruction without predicate and modifiers: "@!P0 LDG.E.U16 R1, ..." -> "LDG"."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def _class(opcode: str) -> str:
    return next((name for name, ops in CLASSES.items() if opcode in ops), "integer, address, other")


def parse_sass(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """nvdisasm's listing -> (instructions in order, loops as (first, last) instruction index): a loop is a
    branch back to a label at or before it."""
    labels, instructions = {}, []
    for line in text.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        code = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if code:
            instructions.append(code.group(1))
    loops = []
    for index, instruction in enumerate(instructions):
        target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", instruction)
        if target and labels.get(target.group(1), index + 1) < index:
            loops.append((labels[target.group(1)], index))
    return instructions, loops


def step_loop(instructions: list[str], loops: list[tuple[int, int]]) -> collections.Counter:
    """Opcode counts of the scan-step loop: the innermost loop (no other loop inside it) with the most MUFU
    instructions (the step's exponentials; Triton leaves dynamic loops unrolled once)."""
    innermost = [(a, b) for a, b in loops if not any(a <= a2 and b2 <= b and (a2, b2) != (a, b) for a2, b2 in loops)]
    if not innermost:
        raise WdmError("no loop found in the kernel's SASS: is this a scan kernel?")
    counts = [collections.Counter(_opcode(i) for i in instructions[a:b + 1]) for a, b in innermost]
    return max(counts, key=lambda c: (c["MUFU"], sum(c.values())))


def _triton_tools() -> Path:
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "nvdisasm").exists():
        raise WdmError(f"Triton's nvdisasm is not at {tools}: bench sass needs Triton's NVIDIA backend")
    return tools


@contextmanager
def _compile_instead_of_launch(builds: list[KernelBuild], workdir: Path):
    """Within the block, a Triton kernel launch compiles for sm_90 as the launcher would and records the cubin,
    and runs nothing. Mirrors JITFunction.run of Triton 3.x (binder, _pack_args): what it specialises is what
    a launch on a GPU would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit

    target = GPUTarget("cuda", 90, WARP)
    backend = make_backend(target)
    original = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or triton.knobs.runtime.debug
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = triton.knobs.compilation.fpsan_homomorphic_casts
        binder = jit.create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
        path = workdir / f"{len(builds)}-{self.__name__}.cubin"
        path.write_bytes(kernel.asm["cubin"])
        builds.append(KernelBuild(self.__name__, (), tuple(grid), options.num_warps, path))

    jit.JITFunction.run = compile_only
    try:
        yield
    finally:
        jit.JITFunction.run = original


def compile_scan(batch: int, d: int, length: int, configs: dict[str, tuple], workdir: Path, n: int = 16):
    """The plain triton scan's kernels at (batch, d, length) in the model's layout (bf16, N states, z, D,
    delta_bias, softplus: the mixer's call), compiled for sm_90 at `configs` ({kind: (BD, warps[, maxnreg])}).
    Returns one KernelBuild per launch of the forward and the backward."""
    import torch

    from wdmctl.bench.scan import scan_inputs
    from wdmctl.scan.triton import selective_scan_triton
    from wdmctl.scan.triton.launch import forced_configs

    x = scan_inputs(batch, d, length, n=n, device="meta")
    for key in ("u", "delta", "B", "C", "z"):
        x[key].requires_grad_(True)
    builds: list[KernelBuild] = []
    with forced_configs(configs), _compile_instead_of_launch(builds, workdir):
        y = selective_scan_triton(**x, delta_softplus=True)
        y.backward(torch.ones_like(y))
    for build in builds:
        build.config = tuple(configs[KERNEL_KINDS[build.name]])
    return builds


def disassemble(build: KernelBuild) -> dict:
    """Registers, stack (spills) and the step loop's opcode counts of one compiled kernel."""
    tools = _triton_tools()
    usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(build.cubin)],
                           capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(build.cubin)],
                          capture_output=True, text=True, check=True).stdout
    loop = step_loop(*parse_sass(sass))
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return dict(registers=registers, stack_bytes=stack, loop=loop)


def resident_warps_per_sm(registers: int, warps_per_program: int) -> int:
    """Warps an SM holds at once, by registers (allocated per warp in units of 256, i.e. 8 per thread) and by the
    resident-program and warp limits."""
    per_warp = -(-registers // 8) * 8 * WARP
    programs = min(REGISTERS_PER_SM // (per_warp * warps_per_program), MAX_PROGRAMS_PER_SM,
                   MAX_WARPS_PER_SM // warps_per_program)
    return programs * warps_per_program


def kernel_floor(loop: collections.Counter, registers: int, build: KernelBuild, length: int, gpu: str) -> dict:
    """The step's cost (issue and MUFU clocks of one warp-step) and the kernel's floor on `gpu`: a warp stays on
    one scheduler, which issues one instruction per clock, so the scheduler given the most warps (at least
    warps / schedulers, rounded up, however they are placed) needs that many warps' steps of clocks."""
    sms, clock = GPUS[gpu]
    instructions = sum(loop.values())
    step_clocks = max(instructions, MUFU_CLOCKS * loop["MUFU"])
    programs = build.grid[0] * build.grid[1] * (build.grid[2] if len(build.grid) > 2 else 1)
    warps = programs * build.warps
    per_scheduler = -(-warps // (sms * SCHEDULERS_PER_SM))
    resident = resident_warps_per_sm(registers, build.warps)
    by_class = collections.Counter()
    for opcode, count in loop.items():
        by_class[_class(opcode)] += count
    return dict(
        step_instructions=instructions, step_mufu=loop["MUFU"], step_by_class=dict(by_class.most_common()),
        step_floor_clocks=step_clocks, step_bound="issue" if instructions >= MUFU_CLOCKS * loop["MUFU"] else "MUFU",
        warps=warps, warps_per_scheduler=per_scheduler, resident_warps_per_sm=resident,
        waves=round(warps / (resident * sms), 2),
        floor_us=round(1e6 * per_scheduler * length * step_clocks / clock, 1),
        # what the step's exponentials alone take of the MUFU pipe, whatever else the step does
        mufu_floor_us=round(1e6 * per_scheduler * length * MUFU_CLOCKS * loop["MUFU"] / clock, 1))


def _measured_run(path: str | None, shapes) -> tuple[str, dict, dict]:
    """(GPU name, {(shape, kind): config}, {(shape, kernel): gpu us}) from a `bench scan` JSON with triton rows,
    or the default configs and no times."""
    if path is None:
        return "NVIDIA H200", {}, {}
    try:
        payload = json.loads(Path(path).read_text())
        gpu = payload["device"]["gpu"]
        tuned, profile = payload["triton_configs"], payload.get("triton_profile", {})
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WdmError(f"--measured {path}: not a `bench scan` JSON with triton configs ({err})") from None
    if gpu not in GPUS:
        raise WdmError(f"--measured {path} ran on {gpu!r}; bench sass knows {', '.join(GPUS)}")
    configs = {}
    for key, config in tuned.items():
        kind, batch, d, length = key.split()[:4]
        if kind in DEFAULT_CONFIGS and "token_major" not in key:
            configs.setdefault(((int(batch), int(d), int(length)), kind), tuple(config))
    times = {}
    for shape_text, kernels in profile.items():
        shape = tuple(int(v) for v in shape_text.split("x"))
        for row in kernels:
            times[(shape, row["kernel"])] = row["gpu_us"]
    missing = [s for s in shapes if not any((s, kind) in configs for kind in DEFAULT_CONFIGS)]
    if missing:
        raise WdmError(f"--measured {path} has no triton run at {', '.join('x'.join(map(str, s)) for s in missing)}")
    return gpu, configs, times


def benchmark_sass(shapes, measured: str | None = None, configs: dict[str, tuple] | None = None,
                   workdir: str | Path | None = None) -> dict:
    """Per shape and kernel: the step loop's instructions by class, registers, occupancy, the floor on the
    GPU (the measured run's, else the H200) and, from a measured run, its time and time over floor."""
    import tempfile

    import triton

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise WdmError("bench sass compiles for the GPU: unset TRITON_INTERPRET")
    gpu, tuned, times = _measured_run(measured, shapes)
    rows, totals = [], []
    with tempfile.TemporaryDirectory() if workdir is None else _existing(workdir) as folder:
        for shape in shapes:
            batch, d, length = shape
            chosen = {kind: tuned.get((shape, kind), (configs or DEFAULT_CONFIGS)[kind]) for kind in DEFAULT_CONFIGS}
            total = dict(shape="x".join(map(str, shape)), floor_us=0.0, mufu_floor_us=0.0, measured_us=0.0)
            for build in compile_scan(batch, d, length, chosen, Path(folder)):
                code = disassemble(build)
                row = dict(shape=total["shape"], kernel=build.name, config=list(build.config), grid=list(build.grid),
                           registers=code["registers"], stack_bytes=code["stack_bytes"],
                           **kernel_floor(code["loop"], code["registers"], build, length, gpu))
                if (shape, build.name) in times:
                    row["measured_us"] = times[(shape, build.name)]
                    row["measured_over_floor"] = round(row["measured_us"] / row["floor_us"], 2)
                    total["measured_us"] += row["measured_us"]
                total["floor_us"] += row["floor_us"]
                total["mufu_floor_us"] += row["mufu_floor_us"]
                rows.append(row)
            total["floor_us"], total["mufu_floor_us"] = round(total["floor_us"], 1), round(total["mufu_floor_us"], 1)
            if total["measured_us"]:
                total["measured_us"] = round(total["measured_us"], 1)
                total["measured_over_floor"] = round(total["measured_us"] / total["floor_us"], 2)
            else:
                del total["measured_us"]
            totals.append(total)
    return dict(benchmark="sass", target="sm_90", triton=triton.__version__, gpu_for_floor=gpu,
                gpu_spec=dict(multiprocessors=GPUS[gpu][0], sm_clock_hz=GPUS[gpu][1]),
                measured=measured, kernels=rows, forward_backward=totals)


@contextmanager
def _existing(folder):
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    yield str(path)
