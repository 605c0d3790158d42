"""No folder of the checkout shadows an installed distribution.

Run from the checkout's root (pytest's rootdir insertion, `python -m mmfast.train`, `python -c`), the
root is the first entry of sys.path. A folder there with an __init__.py is then a regular package that
wins over anything installed: transformers >= 5.25 imports the `kernels` distribution, and would get
mmfast's Triton kernels instead. kernels/ is a namespace folder (no __init__.py), installed as
mmfast.kernels through the symlink mmfast/kernels, so an installed `kernels` always wins.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
# Regular packages at the top of the checkout, and why each may be one.
TOP_LEVEL_PACKAGES = {
    "mmfast": "the library itself",
    "tests": "pytest imports tests.helpers and tests.train.* by their package names",
}


def _run_at_the_root(code: str, extra_path: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)  # after the root ('' for -c) and before site-packages
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fake_distribution(site: Path, name: str) -> None:
    """A minimal installed distribution `name`: a package with a marker and its dist-info."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text('ORIGIN = "the installed distribution"\n')
    info = site / f"{name}-99.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 99.0.0\n")
    (info / "top_level.txt").write_text(f"{name}\n")


def test_an_installed_kernels_distribution_wins_over_the_checkout_folder(tmp_path):
    _fake_distribution(tmp_path, "kernels")
    seen = _run_at_the_root(
        "import json, kernels, mmfast.kernels.compile_spec as ours\n"
        "print(json.dumps({'kernels': getattr(kernels, 'ORIGIN', kernels.__file__), 'ours': ours.__file__,"
        " 'spec': ours.CompileSpec.__name__}))",
        extra_path=tmp_path,
    )
    assert seen["kernels"] == "the installed distribution"
    assert Path(seen["ours"]).resolve() == REPOSITORY / "kernels" / "compile_spec.py"
    assert seen["spec"] == "CompileSpec"


def test_every_triton_kernel_module_imports_as_mmfast_kernels_from_the_root():
    modules = sorted(path.stem for path in (REPOSITORY / "kernels").glob("*.py"))
    seen = _run_at_the_root(
        "import importlib, json\n"
        f"names = {modules!r}\n"
        "print(json.dumps({n: importlib.import_module('mmfast.kernels.' + n).__file__ for n in names}))"
    )
    for name, path in seen.items():
        assert Path(path).resolve() == REPOSITORY / "kernels" / f"{name}.py"


def test_transformers_training_arguments_import_from_the_root():
    """The failure of issue 18 as users met it: transformers imports its own `kernels` on the way."""
    seen = _run_at_the_root(
        "import json\nfrom transformers import TrainingArguments\nimport transformers\n"
        "print(json.dumps({'version': transformers.__version__}))"
    )
    assert seen["version"]


def test_no_top_level_folder_is_a_package_an_installed_distribution_provides():
    packages = {path.parent.name for path in REPOSITORY.glob("*/__init__.py")}
    assert packages <= set(TOP_LEVEL_PACKAGES), (
        f"{sorted(packages - set(TOP_LEVEL_PACKAGES))} at the checkout's root would shadow any distribution of "
        "that name; make it a namespace folder (no __init__.py) as kernels/ is"
    )
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in packages - {"mmfast"} if name in installed}
    assert not clashes, f"checkout folders shadow installed distributions: {clashes}"
    assert not (REPOSITORY / "kernels" / "__init__.py").exists()
    assert (REPOSITORY / "mmfast" / "kernels").resolve() == REPOSITORY / "kernels"
