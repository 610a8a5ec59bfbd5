"""The interpreter runs the kernels' Python, not Triton's compiler: type, layout and register
problems only show when compiling for a GPU.  This compiles every kernel, at the launch shapes
the dispatch picks, to an sm_90 cubin (no GPU needed: triton ships ptxas), in a fresh process
without TRITON_INTERPRET."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r"""
    import json, sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", 90, 32)

    @triton.jit
    def _probe(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.arange(0, BLOCK).to(tl.float32))

    try:  # is the toolchain there at all?
        triton.compile(ASTSource(_probe, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16}),
                       target=target)
    except Exception as exc:
        print("RESULT" + json.dumps({"toolchain": repr(exc)[:300]}))
        sys.exit(0)

    import aerl_fast.kernels.pg_loss_triton as P
    import aerl_fast.kernels.pgd_update as PM
    assert not P.INTERPRETED
    built = []

    def build(kernel, sig, consts, warps, name):
        k = triton.compile(ASTSource(kernel, sig, consts), target=target,
                           options={"num_warps": warps})
        assert "cubin" in k.asm, name
        built.append(name)

    def fwd_sig(dt):
        return {"logits_ptr": "*" + dt, "stride_b": "i32", "stride_c": "i32", "labels_ptr": "*i64",
                "actions_in_ptr": "*i64", "seed_ptr": "*i64", "baseline_ptr": "*fp32", "loss_ptr": "*fp32",
                "actions_ptr": "*i64", "rewards_ptr": "*fp32", "logp_ptr": "*fp32",
                "lse_ptr": "*fp32", "coef_ptr": "*fp32", "B": "i32", "C": "i32",
                "epsilon": "fp32", "prob_floor": "fp32", "EXPLORE_BATCH": "constexpr",
                "HAS_FLOOR": "constexpr", "HAS_ACTIONS": "constexpr", "HAS_BASELINE": "constexpr",
                "ROWS": "constexpr", "BLOCK_C": "constexpr"}

    cases = [(10, "fp32", False, False, False, False), (10, "fp32", False, False, False, True),
             (1000, "bf16", True, True, False, True), (5000, "fp16", False, True, True, True)]
    for C, dt, batch, floor, acts, base in cases:
        bc, rows, w = P._pg_launch_config(256, C)
        build(P._pg_fwd_kernel, fwd_sig(dt), {"EXPLORE_BATCH": batch, "HAS_FLOOR": floor,
              "HAS_ACTIONS": acts, "HAS_BASELINE": base, "ROWS": rows, "BLOCK_C": bc}, w,
              f"fwd C={C} {dt}" + (" baseline" if base else ""))
        build(P._pg_bwd_kernel, {"grad_rows_ptr": "*fp32", "logits_ptr": "*" + dt,
              "stride_b": "i32", "stride_c": "i32", "lse_ptr": "*fp32", "actions_ptr": "*i64",
              "coef_ptr": "*fp32", "grad_ptr": "*" + dt, "B": "i32", "C": "i32",
              "ROWS": "constexpr", "BLOCK_C": "constexpr"}, {"ROWS": rows, "BLOCK_C": bc}, w,
              f"bwd C={C} {dt}")
    common = {"x0_ptr": "*fp32", "g_ptr": "*fp32", "step_ptr": "*fp32", "eps_ptr": "*fp32",
              "lo": "fp32", "hi": "fp32", "HAS_CLAMP": "constexpr"}
    build(PM._pgd_linf_kernel, dict(common, xadv_ptr="*fp16", N="i32", total="i64",
          BLOCK="constexpr"), {"HAS_CLAMP": True, "BLOCK": PM._BLOCK_LINF}, 4, "pgd linf")
    build(PM._pgd_l2_kernel, dict(common, xadv_ptr="*fp32", B="i32", N="i32", ROWS="constexpr",
          BLOCK_N="constexpr"), {"HAS_CLAMP": False, "ROWS": 1, "BLOCK_N": PM._MAX_BLOCK_N}, 8,
          "pgd l2")
    print("RESULT" + json.dumps({"built": built}))
""")


def test_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a real compile, not a cache hit
    script = tmp_path / "compile_kernels.py"  # @triton.jit needs its source in a file
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][6:])
    if "toolchain" in res:
        pytest.skip(f"triton cannot compile for sm_90 here: {res['toolchain']}")
    assert len(res["built"]) == 10, res
