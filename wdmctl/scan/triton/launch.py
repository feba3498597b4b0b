"""Launch configurations and their autotuning, and the inline PTX lane sum some configurations use."""

from __future__ import annotations

import os
from contextlib import contextmanager

import triton
from triton.runtime.errors import OutOfResources, PTXASError

from wdmctl.scan.triton.common import INTERPRET

# ----------------------------------------------------------------------------------------------------
# Launch configurations: (BD, num_warps[, maxnreg]). BD >= 32 * num_warps keeps all N states of a channel in
# one thread (see the module docstring); BD = 64 * num_warps gives each thread two channels. maxnreg caps
# the registers per thread (ptxas' .maxnreg) to fit more warps on an SM.
# ----------------------------------------------------------------------------------------------------

FWD_CONFIGS = ((32, 1), (16, 1), (64, 2), (64, 1), (128, 2))
# The backward kernels hold ~3 state tiles plus B_t, C_t of this step and the next: two channels per thread
# spill, so one at most. BD = 16 on one warp makes Triton split each channel's states over 2 lanes: half
# the registers, twice the warps, a shuffle per sum over N. Tried and dropped (never chosen by the tuner
# on the H100, docs/triton-scan.md): BD 8, 2-warp blocks, B_t/C_t loaded at use instead of a step ahead,
# and the sums over channels for dB/dC on the tensor cores instead of warp shuffles.
# The backward passes are latency-bound (a step's dependency chain, 8-10 resident warps per SM at 193 / 238
# registers): the capped configs trade a few instructions (168: no spills, +13 per step in the SASS; 128:
# spills outside the time loop) for 12 and 16 warps per SM.
BWD_CONFIGS = ((32, 1), (16, 1), (32, 1, 168), (32, 1, 128))
DEFAULT_SCAN_CONFIG = (64, 2)
DEFAULT_BWD_CONFIG = (64, 2)
TUNE_MIN_CHANNELS = 8192  # batch * d below this: small problems (tests) skip tuning and its compiles
_TUNED: dict[tuple, tuple] = {}


_FORCED: dict[str, tuple] = {}


@contextmanager
def forced_configs(configs: dict[str, tuple]):
    """Within the block, the kernels of these kinds ("fwd", "bwd1", "bwd2", ...) launch with these configs and
    nothing is timed: how `bench sass` compiles the configs a GPU's tuner chose, on a machine without one."""
    saved = dict(_FORCED)
    _FORCED.update(configs)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def _choose(kind: str, key: tuple, channels: int, launch, configs, default):
    """Pick a config (BD, num_warps, or a conv tile) for one kernel and problem: a forced one (forced_configs), the
    env override WDM_TRITON_SCAN_CONFIG="BD,warps[,maxnreg]" (scan kernels, for profiling), the default for small
    problems and the interpreter, else the fastest config measured once on the real arguments (every config
    writes only its own outputs, so trial runs are harmless)."""
    if kind in _FORCED:
        return _FORCED[kind]
    override = os.environ.get("WDM_TRITON_SCAN_CONFIG")
    if override and not kind.startswith("conv"):
        return tuple(int(v) for v in override.split(","))
    if INTERPRET or channels < TUNE_MIN_CHANNELS:
        return default
    full_key = (kind, *key)
    if full_key not in _TUNED:
        timings = {}
        for cfg in configs:
            try:
                timings[cfg] = triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")
            except (OutOfResources, PTXASError):  # a config that does not fit is skipped
                continue
        _TUNED[full_key] = min(timings, key=timings.get)
    return _TUNED[full_key]


def tuned_configs() -> dict[str, tuple]:
    """The configs chosen so far, for benchmark reports: {"kind key...": (BD, num_warps)}."""
    return {" ".join(str(k) for k in key): cfg for key, cfg in _TUNED.items()}


def _launch_options(cfg: tuple) -> dict[str, int]:
    """num_warps (and maxnreg where the config caps registers) of a scan config (BD, num_warps[, maxnreg])."""
    options = {"num_warps": cfg[1]}
    if len(cfg) > 2 and cfg[2]:
        options["maxnreg"] = cfg[2]
    return options


def lane_sum_asm(np_: int) -> tuple[str, str]:
    """PTX (and its operand constraints) that sums an (NP, 32 lanes) tile over the warp's lanes by
    reduce-scatter: at each level every lane keeps half of its values and swaps the other half with the lane
    whose bit `mask` differs (16, 8, ... : NP/2 + NP/4 + ... + 1 shuffles), then plain butterflies over the
    remaining lane bits. Lane l ends with the total of state l >> (5 - log2 NP), returned in every output.
    A full butterfly per state (what tl.sum does) takes 5 NP shuffles and adds: 80 of each at NP = 16, against
    16 here. Operands: $0 .. $(NP-1) out, $NP .. $(2 NP - 1) in (inline_asm_elementwise with pack = NP)."""
    if np_ < 1 or np_ > 32 or np_ & (np_ - 1):
        raise ValueError(f"lane_sum_asm needs a power of two up to 32 states, not {np_}")
    lines = ["{", ".reg .pred %p;", ".reg .b32 %lane, %bit;", "mov.u32 %lane, %laneid;"]
    values, mask, level = [f"${np_ + k}" for k in range(np_)], 16, 0
    while len(values) > 1:  # reduce-scatter: lanes with bit `mask` set keep the upper half
        half = len(values) // 2
        lines.append(f"and.b32 %bit, %lane, {mask};")
        lines.append("setp.ne.u32 %p, %bit, 0;")
        kept = []
        for k in range(half):
            keep, send, recv, total = (f"%k{level}_{k}", f"%s{level}_{k}", f"%r{level}_{k}", f"%a{level}_{k}")
            lines.append(f".reg .f32 {keep}, {send}, {recv}, {total};")
            lines.append(f"selp.f32 {keep}, {values[k + half]}, {values[k]}, %p;")
            lines.append(f"selp.f32 {send}, {values[k]}, {values[k + half]}, %p;")
            lines.append(f"shfl.sync.bfly.b32 {recv}, {send}, {mask}, 0x1f, 0xffffffff;")
            lines.append(f"add.f32 {total}, {keep}, {recv};")
            kept.append(total)
        values, mask, level = kept, mask // 2, level + 1
    value = values[0]
    while mask >= 1:  # the lanes that hold the same state: plain butterfly
        recv, total = f"%r{level}", f"%a{level}"
        lines.append(f".reg .f32 {recv}, {total};")
        lines.append(f"shfl.sync.bfly.b32 {recv}, {value}, {mask}, 0x1f, 0xffffffff;")
        lines.append(f"add.f32 {total}, {value}, {recv};")
        value, mask, level = total, mask // 2, level + 1
    lines += [f"mov.b32 ${k}, {value};" for k in range(np_)] + ["}"]
    return "\n".join(lines), ",".join(["=f"] * np_ + ["f"] * np_)


def _lane_sum_flags(cfg: tuple[int, int], np_: int) -> dict[str, str]:
    """The kernels' LANE_SUM constexprs for a (BD, num_warps) config: the PTX channel sum where every warp
    holds 32 whole channels and all states of each (BD = 32 * num_warps, N <= 32, compiled), else "" (tl.sum).
    The interpreter cannot run PTX."""
    bd, warps = cfg[:2]
    if INTERPRET or bd != 32 * warps or np_ > 32:
        return dict(LANE_SUM="", LANE_SUM_IO="")
    asm, io = lane_sum_asm(np_)
    return dict(LANE_SUM=asm, LANE_SUM_IO=io)


def _partial_rows(cfg: tuple[int, int], d: int, lane_sum: dict[str, str]) -> int:
    """Partial-sum rows per batch row for dB / dC: one per 32 channels with the PTX channel sum, else one
    per program."""
    return triton.cdiv(d, 32) if lane_sum["LANE_SUM"] else triton.cdiv(d, cfg[0])
