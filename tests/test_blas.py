"""charlm/blas.py: the BLAS Numba calls is loaded without importing scipy.linalg, kernels that
multiply still get the right answer through it, and SciPy keeps working afterwards. Each case runs
in a fresh interpreter, because the point is what gets imported."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernels_load_blas_without_scipy_linalg_and_multiply_correctly():
    got = run_fresh("""
        import json, sys
        import numpy as np
        import charlm.kernels
        loaded = sorted(m for m in sys.modules if m.startswith("scipy.linalg"))
        from charlm.kernels import layers
        rng = np.random.default_rng(0)
        x = rng.standard_normal((7, 5)).astype(np.float32)
        w = rng.standard_normal((3, 5)).astype(np.float32)
        b = rng.standard_normal(3).astype(np.float32)
        y = np.zeros((7, 3), np.float32)
        layers.linear_forward(y, x, w, b)
        err = float(np.abs(y - (x.astype(np.float64) @ w.T.astype(np.float64) + b)).max())
        print(json.dumps({"loaded": loaded, "after": sorted(m for m in sys.modules if m.startswith("scipy.linalg")),
                          "err": err}))
    """)
    assert got["loaded"] == ["scipy.linalg.cython_blas"]
    assert "scipy.linalg" not in got["after"]
    assert got["err"] < 1e-4


def test_scipy_linalg_still_imports_and_works_afterwards():
    got = run_fresh("""
        import json
        import numpy as np
        import charlm.kernels
        import scipy.linalg
        from scipy.linalg import cython_blas
        a = np.array([[2.0, 1.0], [1.0, 3.0]])
        print(json.dumps({"eig": sorted(scipy.linalg.eigvalsh(a).tolist()),
                          "same": cython_blas is __import__("sys").modules["scipy.linalg.cython_blas"]}))
    """)
    assert got["same"]
    assert abs(got["eig"][0] - (5 - 5 ** 0.5) / 2) < 1e-12 and abs(got["eig"][1] - (5 + 5 ** 0.5) / 2) < 1e-12


def test_falls_back_to_the_ordinary_import_when_the_file_is_not_found():
    got = run_fresh("""
        import json, sys
        import charlm.runtime as blas
        def missing():
            raise ImportError("pretend SciPy is laid out differently")
        blas._load_from_file = missing
        blas.load_blas()
        print(json.dumps({"linalg": "scipy.linalg" in sys.modules,
                          "capi": len(sys.modules["scipy.linalg.cython_blas"].__pyx_capi__)}))
    """)
    assert got["linalg"] and got["capi"] > 10
