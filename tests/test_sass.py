"""`wdmctl bench sass`: the scan kernels' step loops read from their sm_90 machine code, and the floor from them.

The parsing and the floor arithmetic are tested on listings and counts made here; the whole command compiles the
real kernels for sm_90 in a subprocess (this process runs Triton's interpreter, whose kernels cannot be compiled)
and is checked against the H200 run in benchmarks/: a floor must lie under what the GPU measured.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_faults import cli, one_error_line
from wdmctl.bench import sass
from wdmctl.errors import WdmError

REPO = Path(__file__).resolve().parents[1]
H200_RUN = REPO / "benchmarks" / "h200-issue16-scan-model-shapes.json"

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FADD R2, R2, 1 ;
.L_x_1:
        /*0020*/                   MUFU.EX2 R3, R3 ;
        /*0030*/              @!P0 LDG.E.U16 R4, desc[UR4][R6.64] ;
        /*0040*/                   FFMA R5, R3, R4, R5 ;
        /*0050*/               @P1 BRA `(.L_x_1) ;
        /*0060*/                   IMAD R7, R7, 2, RZ ;
        /*0070*/                   BRA `(.L_x_0) ;
.L_x_2:
        /*0080*/                   BRA `(.L_x_2);
        /*0090*/                   EXIT ;
"""


def test_the_step_loop_is_the_innermost_loop_with_the_exponentials():
    instructions, loops = sass.parse_sass(LISTING)
    assert len(instructions) == 10 and (1, 7) in loops and (2, 5) in loops
    loop = sass.step_loop(instructions, loops)
    # the inner loop (MUFU, LDG, FFMA and its branch back), not the outer one nor the one-instruction trap
    assert loop == collections.Counter(MUFU=1, LDG=1, FFMA=1, BRA=1)
    assert sass._opcode("@!P0 LDG.E.U16 R4, desc[UR4][R6.64]") == "LDG"
    with pytest.raises(WdmError, match="no loop"):
        sass.step_loop(["FADD R1, R1, 1", "EXIT"], [])


@pytest.mark.parametrize("registers,warps,resident", [(96, 1, 21), (168, 1, 12), (231, 1, 8), (64, 1, 32),
                                                      (40, 1, 32), (64, 2, 32), (128, 2, 16)])
def test_resident_warps_follow_registers_and_the_block_limit(registers, warps, resident):
    assert sass.resident_warps_per_sm(registers, warps) == resident


def test_the_floor_is_the_busiest_schedulers_steps_at_one_instruction_per_clock():
    build = sass.KernelBuild("k", (32, 1), (48, 64), 1, Path("unused"))  # 3,072 one-warp programs
    issue_bound = collections.Counter(FFMA=150, MUFU=10, LDG=40)   # 200 instructions, MUFU 80 clocks
    row = sass.kernel_floor(issue_bound, 96, build, 258, "NVIDIA H200")
    assert row["step_instructions"] == 200 and row["step_bound"] == "issue" and row["step_floor_clocks"] == 200
    # 3,072 warps on 132 x 4 schedulers: some scheduler holds 6, each 258 steps of 200 clocks at 1.98 GHz
    assert row["warps_per_scheduler"] == 6
    assert row["floor_us"] == pytest.approx(6 * 258 * 200 / 1.98e9 * 1e6, abs=0.1)
    assert row["step_by_class"] == {"fp32": 150, "load": 40, "mufu": 10}
    assert row["mufu_floor_us"] == pytest.approx(6 * 258 * 80 / 1.98e9 * 1e6, abs=0.1)
    mufu_bound = collections.Counter(FFMA=50, MUFU=20)               # 70 instructions, MUFU 160 clocks
    row = sass.kernel_floor(mufu_bound, 96, build, 258, "NVIDIA H200")
    assert row["step_bound"] == "MUFU" and row["step_floor_clocks"] == 160


def test_a_measured_run_must_be_a_known_gpus_bench_scan_with_the_shapes(tmp_path):
    gpu, configs, times = sass._measured_run(str(H200_RUN), [(64, 1536, 258)])
    assert gpu == "NVIDIA H200"
    assert configs[((64, 1536, 258), "fwd")] == (32, 1) and configs[((64, 1536, 258), "bwd1")] == (32, 1, 168)
    assert times[((64, 1536, 258), "_scan_fwd_kernel")] == pytest.approx(344.2)
    with pytest.raises(WdmError, match="no triton run at 64x1024x258"):
        sass._measured_run(str(H200_RUN), [(64, 1024, 258)])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(H200_RUN.read_text()), "device": {"gpu": "NVIDIA A100"}}))
    with pytest.raises(WdmError, match="ran on 'NVIDIA A100'"):
        sass._measured_run(str(other), [(64, 1536, 258)])
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(WdmError, match="not a `bench scan` JSON"):
        sass._measured_run(str(broken), [(64, 1536, 258)])


@pytest.mark.parametrize("argv,message", [
    (["--configs", "fwd=32"], "--configs takes KIND=BD,WARPS"),
    (["--configs", "fwd2=32,1"], "--configs takes KIND=BD,WARPS"),
    (["--shapes", "64x1536"], "--shapes must look like"),
])
def test_bad_options_are_one_line(capsys, argv, message):
    code, _, err = cli(capsys, "bench", "sass", *argv)
    assert code != 0 and message in one_error_line(err)


def test_under_the_interpreter_it_says_so(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    code, _, err = cli(capsys, "bench", "sass", "--shapes", "64x1536x258")
    assert code != 0 and "unset TRITON_INTERPRET" in one_error_line(err)


def test_the_real_kernels_compile_for_sm90_and_their_floor_lies_under_the_h200s_times(tmp_path):
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "wdmctl", "bench", "sass", "--shapes", "64x1536x258",
                           "--measured", str(H200_RUN), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(out.read_text())
    rows = {row["kernel"]: row for row in payload["kernels"]}
    assert list(rows) == list(sass.KERNEL_KINDS)
    for name, row in rows.items():
        # one exponential per state and step at least (N = 16, all states in one thread at BD 32 on one warp)
        assert row["step_mufu"] >= 16, row
        assert row["stack_bytes"] == 0, f"{name} spills"
        # no floor may exceed what the H200 measured: that would make the model of the hardware wrong
        assert 1.0 <= row["measured_over_floor"] < 10, row
    assert rows["_scan_bwd1_kernel"]["registers"] <= 168   # the tuned config's register cap reached ptxas
    # B_t and C_t are read as 16-byte vectors (8 loads for 2 x 16 fp32) because the capture specialises the
    # pointers' alignment as a launch does; without it the forward's step would issue 35 scalar loads
    assert rows["_scan_fwd_kernel"]["step_by_class"]["load"] <= 16
    total = payload["forward_backward"][0]
    assert total["floor_us"] == pytest.approx(sum(r["floor_us"] for r in rows.values()), abs=0.5)
    assert total["measured_us"] > total["floor_us"]


def test_configs_without_a_measured_run_are_what_compiles(tmp_path):
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "wdmctl", "bench", "sass", "--shapes", "8x1536x258",
                           "--configs", "fwd=64,2;bwd2=16,1", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["kernel"]: row for row in json.loads(out.read_text())["kernels"]}
    fwd, bwd1, bwd2 = rows.values()
    assert fwd["config"] == [64, 2] and fwd["grid"] == [24, 8] and fwd["warps"] == 384
    assert bwd1["config"] == list(sass.DEFAULT_CONFIGS["bwd1"])
    # BD 16 on a warp: each channel's states split over 2 lanes, half the exponentials per thread and step
    assert bwd2["config"] == [16, 1] and bwd2["grid"] == [96, 8] and bwd2["step_mufu"] < bwd1["step_mufu"]
    assert all("measured_us" not in row for row in rows.values())
