"""A built wheel, installed outside the repository, runs the README's commands.

The package's files (setup.py, sources, examples/configs, ...) are copied to a temporary
folder, a wheel is built there (no build isolation: the CPU torch is already installed), and
installed with ``pip install --target`` into another temporary folder that comes first on
``PYTHONPATH``. ``fdiv-train pipeline --config demo`` (a shipped, named config) then runs from a
third folder, a shortened demo, and the wheel carries the licence metadata.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT_DEMO = ["pretrain.steps=3", "sft.steps=2", "dpo.steps=2", "sft.eval_every=0", "dpo.eval_every=0",
              "data.synthetic.n_pretrain=100", "data.synthetic.n_sft=64", "data.synthetic.n_pref=32",
              "data.synthetic.n_eval=16", "eval.num_prompts=16", "eval.batch_size=16"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md",
                 "constraints.txt"):
        shutil.copy(os.path.join(REPO, name), src / name)
    for d in ("fdiv_kernels", "csrc", os.path.join("examples", "configs")):
        shutil.copytree(os.path.join(REPO, d), src / d, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k != "FDIV_BUILD_EXT"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "dist"), str(src)], check=True, cwd=root, env=env)
    wheel = glob.glob(str(root / "dist" / "fdiv_kernels-*.whl"))[0]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(root / "site"), wheel],
                   check=True, cwd=root)
    return {"root": root, "wheel": wheel, "site": str(root / "site")}


def _run(installed, args, cwd):
    env = dict(os.environ, PYTHONPATH=installed["site"])
    return subprocess.run([sys.executable] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_ships_configs_sources_and_licence(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    configs = sorted(os.path.basename(n) for n in names if n.startswith("fdiv_kernels/train/configs/"))
    assert configs == sorted(os.listdir(os.path.join(REPO, "examples", "configs")))
    assert any(n.startswith("fdiv_kernels/_csrc/") for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(installed["wheel"]).read(meta).decode()
    assert "License-Expression: Apache-2.0" in text or "License: Apache-2.0" in text
    assert "Author: The fdiv_kernels authors" in text
    assert any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in names)


def test_wheel_core_requires_only_torch(installed):
    """``pip install fdiv-kernels`` pulls torch and nothing else; the rest sits behind extras."""
    wheel = zipfile.ZipFile(installed["wheel"])
    text = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert [r.split(">")[0].split("=")[0].split("<")[0].strip() for r in core] == ["torch"], core
    extras = {line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Provides-Extra:")}
    assert {"triton", "train", "hf", "trl", "deepspeed", "bench", "dev"} <= extras, extras


def test_named_demo_config_runs_from_the_installed_wheel_outside_the_repo(installed, tmp_path):
    where = _run(installed, ["-c", "import fdiv_kernels, fdiv_kernels.train.config as c; print(fdiv_kernels.__file__); "
                                   "print(c.resolve_config('zero3'))"], tmp_path)
    assert where.returncode == 0, where.stderr
    pkg, zero3 = where.stdout.split()
    assert pkg.startswith(installed["site"]) and zero3.startswith(installed["site"])  # not the repo's copy
    args = ["-m", "fdiv_kernels.train", "pipeline", "--config", "demo", "--no-progress"]
    for s in SHORT_DEMO:
        args += ["--set", s]
    res = _run(installed, args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "task accuracy (greedy, held-out prompts)" in res.stdout
    run = tmp_path / "runs" / "demo"
    assert (run / "dpo" / "final" / "model.safetensors").exists() and (run / "summary.json").exists()
    version = _run(installed, ["-m", "fdiv_kernels.train", "--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("fdiv-train ")


def _code_lines(markdown: str):
    """The lines of the ```bash blocks of ``markdown``, block by block."""
    import re

    return [[line for line in block.splitlines() if line.strip()]
            for block in re.findall(r"```bash\n(.*?)```", markdown, re.S)]


def test_readme_starts_with_make_and_installs_the_right_torch_first():
    """README starts with `make demo` and `make test` (which says how many minutes it takes); its pip
    section says first which torch to install on a CPU-only and on a CUDA machine: a plain
    `pip install torch` pulls the multi-GB CUDA build on a CPU-only Linux machine (issue 26, item 7)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    first = _code_lines(readme)[0]
    assert readme.startswith("# fdiv_kernels\n\n```bash\n")
    assert [line.split()[:2] for line in first] == [["make", "demo"], ["make", "test"]]
    assert re.search(r"about \d+(-\d+)? minutes on 2 cores", first[1]), first[1]
    pip = readme[readme.index("## Install with pip"):]
    pip = pip[: pip.index("\n## ", 1)]
    commands = [line for block in _code_lines(pip) for line in block if not line.startswith("#")]
    assert commands[0] == "pip install torch --index-url https://download.pytorch.org/whl/cpu", commands
    assert commands[1].startswith("pip install torch --index-url https://download.pytorch.org/whl/cu"), commands
    assert not [c for c in commands if c.split("#")[0].split() == ["pip", "install", "torch"]]
