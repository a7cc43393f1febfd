"""The static sm_90 audit (posenc_triton.bench.audit) passes: every config the autotuner can
pick for the ALiBi kernels at D = 128 bf16 (causal and symmetric, GQA and MHA, fused dropout,
trainable slopes) compiles for sm_90 with real-launch specialisation, without spills,
serialised wgmma or too much shared memory, and the dense forward loads K/V with TMA; the bias
costs at most one fp32 instruction per score over Triton's fused-attention tutorial at the same
tile. The full audit (``--full``: other head dims, dtypes, masks, packed, sm_80) runs by hand."""

import os
import subprocess
import sys

import pytest

try:
    import triton

    TRITON = triton.__version__
except ImportError:
    TRITON = None


@pytest.mark.parametrize("triton_version", [TRITON], ids=lambda v: f"triton-{v}")
def test_audit_sm90(triton_version):
    # The id names the Triton whose compiler was audited: the prunes differ by version.
    if triton_version is None:
        pytest.skip("needs triton")
    if tuple(int(x) for x in triton_version.split(".")[:2]) < (3, 3):
        pytest.skip("ASTSource(constexprs=..., attrs=...) needs triton >= 3.3")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-m", "posenc_triton.bench.audit", "--kernels",
                             "fwd", "dq", "dkdv", "preprocess", "tutorial-fwd", "tutorial-dq",
                             "tutorial-dkdv", "--jobs", "2"],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, (f"triton {triton_version}:\n" + result.stdout[-6000:]
                                    + result.stderr[-3000:])
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][2:]  # no header
    assert len(rows) > 20 and all(line.endswith("| ok |") for line in rows)
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in rows]
    forward = [c for c in cells if c[0].startswith("fwd D128 bf16")]
    assert forward and all(int(c[9]) > 0 for c in forward), "a dense forward without TMA"
    assert any(c[2] == "(128, 128, 8, 3)" for c in forward), "the 128x128 tile is not offered"
    # FP ALU instructions per score: the bias's cost over the tutorial's bias-free loop
    tutorial = {(c[0].split()[0][len("tutorial-"):], c[2]): float(c[11]) for c in cells
                if c[0].startswith("tutorial-")}
    plain = [c for c in cells if c[0].split()[0] in ("fwd", "dq", "dkdv")
             and "dropout" not in c[0] and "slope-grad" not in c[0]]
    assert len(plain) > 20
    for c in plain:
        assert float(c[11]) <= tutorial[c[0].split()[0], c[2]] + 1.0, f"bias too costly: {c}"
