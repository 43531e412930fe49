#!/usr/bin/env python3
"""Set up regkit in a virtual environment, needing nothing but python3.

    python3 scripts/bootstrap.py          # .venv with regkit and its dependencies
    python3 scripts/bootstrap.py --dev    # ... plus the test tools

Why a script and not just ``pip install -e .``: regkit depends on ``torch``, and an unpinned
``torch`` makes pip fetch the newest release, which on Linux is the multi-GB CUDA build, even on
a machine without a GPU. So torch is installed first, by these rules, and then regkit:

1. a torch that already imports in the environment is kept (a user's CUDA build stays);
   if the python running this script has torch and the venv is new, the venv is created with
   ``--system-site-packages`` so that torch is reused rather than installed again;
2. otherwise ``torch==TORCH_VERSION`` from a local wheel (pip's ``find-links``): the wheel alone
   with ``--no-index --no-deps`` (its dependencies are not local wheels), then its small
   pure-Python dependencies from the index, torch itself being installed already;
3. otherwise, on a machine without an NVIDIA driver, the CPU build from the PyTorch CPU index;
4. otherwise ``torch==TORCH_VERSION`` from the default index (the CUDA build on GPU machines).

Standard library only: this runs before anything is installed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

TORCH_VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
ROOT = Path(__file__).resolve().parent.parent


def say(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


def run(cmd: list[str], check: bool = True, quiet: bool = False) -> bool:
    say("$ " + " ".join(cmd))
    kwargs = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if quiet else {}
    result = subprocess.run(cmd, **kwargs)
    if check and result.returncode != 0:
        sys.exit(f"[bootstrap] error: command failed with exit code {result.returncode}: {' '.join(cmd)}")
    return result.returncode == 0


def torch_version(python: str) -> str | None:
    result = subprocess.run(
        [python, "-c", "import torch; print(torch.__version__)"],
        capture_output=True, text=True,
    )
    return result.stdout.strip() if result.returncode == 0 else None


def has_nvidia_driver() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/version").exists()


def venv_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def install_torch(python: str, version: str) -> None:
    found = torch_version(python)
    if found:
        say(f"keeping the installed torch {found}")
        return
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    if run(pip + ["--no-index", "--no-deps", f"torch=={version}"], check=False, quiet=True):
        say(f"installed the local torch {version} wheel; now its dependencies")
        run(pip + ["-q", f"torch=={version}"])  # satisfied already: only the missing dependencies are fetched
        say(f"torch {torch_version(python)} ready")
        return
    say(f"no local wheel of torch {version}")
    if not has_nvidia_driver():
        say("no NVIDIA driver found: installing the CPU build of torch")
        if run(pip + ["--timeout", "30", "--retries", "1", f"torch=={version}", "--index-url", CPU_INDEX],
               check=False):
            return
        say("the PyTorch CPU index was not reachable; falling back to the default index")
    run(pip + [f"torch=={version}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=str(ROOT / ".venv"), help="virtual environment path (default: .venv)")
    parser.add_argument("--dev", action="store_true", help="also install the test dependencies")
    parser.add_argument("--torch", default=TORCH_VERSION, help=f"torch version to install if none is present (default {TORCH_VERSION})")
    args = parser.parse_args()

    env = Path(args.venv).resolve()
    python = venv_python(env)
    if not python.exists():
        reuse = torch_version(sys.executable) is not None
        say(f"creating {env}" + (" (reusing this python's torch via --system-site-packages)" if reuse else ""))
        venv.EnvBuilder(with_pip=True, system_site_packages=reuse).create(env)
    else:
        say(f"using the existing environment {env}")

    install_torch(str(python), args.torch)
    target = f"{ROOT}[dev]" if args.dev else str(ROOT)
    run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-e", target])
    run([str(python), "-c", "import regkit, torch; print(f'[bootstrap] regkit {regkit.__version__} ready "
                            "(torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})')"])


if __name__ == "__main__":
    main()
