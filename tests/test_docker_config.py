"""Static checks of the Docker deployment files in docker/ (no Docker daemon needed).

What is checked against what:
- docker/compose.yml and docker/with-tls.yml: topology (1 SuperLink, N SuperNodes,
  one ClientApp SuperExec per SuperNode, one ServerApp SuperExec), partition ids
  0..N-1 with num-partitions=N, Runtime API ports/addresses, published host ports,
  image tags, build contexts, bind-mounted host paths, TLS/auth flags.
- docker/Dockerfile: base image/tag vs. the flwr pin in pyproject.toml and the
  installed flwr, CPU-only torch, `pip install .`, COPY sources vs. the packages the
  apps import, and the Dockerfile.dockerignore allow-list.
- docker/generate_certs.sh: run for real (skipped without openssl/ssh-keygen) and
  the files the overlay mounts are compared with what it produces.

The `slow`-marked test at the end starts the exact compose commands (service
names mapped to 127.0.0.1) as real flwr 1.41 processes, in both the insecure and the
TLS + SuperNode-auth variant, and runs a tiny Flower app through them.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yml"
OVERLAY = DOCKER / "with-tls.yml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
GEN_SCRIPT = DOCKER / "generate_certs.sh"
# Folders that docker/generate_certs.sh creates (relative to its output folder).
GENERATED_DIRS = ("certs", "keys")

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


# ----------------------------------------------------------------------------- helpers
def interpolate(value: str) -> str:
    """Resolve compose variables to their defaults (the environment is ignored)."""

    def repl(m: re.Match[str]) -> str:
        op, default, bare = m.group(2), m.group(3), m.group(4)
        if bare is not None or op is None:
            pytest.fail(f"compose variable without a default: {m.group(0)!r}")
        if op.endswith("?"):
            pytest.fail(f"compose variable that must be set: {m.group(0)!r}")
        return default

    return _VAR.sub(repl, value.replace("$$", "\0")).replace("\0", "$")


def load_yaml(path: Path) -> dict:
    assert path.is_file(), f"missing {path}"
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), path
    return data


def command(service: dict) -> list[str]:
    cmd = service.get("command", [])
    if isinstance(cmd, str):
        cmd = shlex.split(cmd)
    return [interpolate(str(c)) for c in cmd]


def flag(cmd: list[str], name: str) -> str | None:
    """Value of `--name value` or `--name=value` (None if absent)."""
    for i, tok in enumerate(cmd):
        if tok == name:
            assert i + 1 < len(cmd), f"{name} without a value in {cmd}"
            return cmd[i + 1]
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
    return None


def has_flag(cmd: list[str], name: str) -> bool:
    return any(tok == name or tok.startswith(name + "=") for tok in cmd)


def image_of(service: dict) -> str:
    return interpolate(str(service.get("image", "")))


def parse_node_config(text: str) -> dict[str, str]:
    out = {}
    for item in shlex.split(text):
        key, sep, val = item.partition("=")
        assert sep, f"bad node-config item {item!r}"
        out[key] = val.strip("\"'")
    return out


def split_hostport(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    assert sep and host and port.isdigit(), f"bad address {addr!r}"
    return host, int(port)


def runtime_address(cmd: list[str]) -> str | None:
    return flag(cmd, "--runtime-api-address") or flag(cmd, "--appio-api-address")


def merge_services(base: dict, overlay: dict) -> dict:
    """Compose-style merge for the keys used here: command replaced, volumes by target."""
    merged = {name: dict(svc) for name, svc in base["services"].items()}
    for name, svc in overlay["services"].items():
        target = merged.setdefault(name, {})
        for key, val in svc.items():
            if key == "volumes":
                vols = {volume_target(v): v for v in target.get("volumes", [])}
                vols.update({volume_target(v): v for v in val})
                target["volumes"] = list(vols.values())
            elif key == "ports":
                target["ports"] = list(target.get("ports", [])) + list(val)
            else:
                target[key] = val
    return merged


def parse_volume(vol) -> dict:
    """Return {type, source, target, read_only} for short or long volume syntax."""
    if isinstance(vol, dict):
        return {
            "type": vol.get("type", "volume"),
            "source": interpolate(str(vol.get("source", ""))),
            "target": vol["target"],
            "read_only": bool(vol.get("read_only", False)),
            # long syntax: never created unless asked for (Compose spec; only the short
            # syntax implies it, for docker-compose 1.x compatibility)
            "create_host_path": vol.get("bind", {}).get("create_host_path", False),
        }
    parts = interpolate(str(vol)).split(":")
    if len(parts) == 1:
        return {"type": "volume", "source": "", "target": parts[0], "read_only": False,
                "create_host_path": True}
    source, target = parts[0], parts[1]
    mode = parts[2] if len(parts) > 2 else "rw"
    kind = "bind" if source.startswith((".", "/", "~")) else "volume"
    return {"type": kind, "source": source, "target": target,
            "read_only": "ro" in mode.split(","), "create_host_path": True}


def volume_target(vol) -> str:
    return parse_volume(vol)["target"]


def mounts(service: dict) -> dict[str, dict]:
    return {m["target"]: m for m in map(parse_volume, service.get("volumes", []))}


def host_path(source: str) -> Path:
    """Bind sources are relative to the compose file's folder (docker/)."""
    return (DOCKER / Path(source).expanduser()).resolve()


def published_ports(service: dict) -> list[tuple[str, int, int]]:
    out = []
    for spec in service.get("ports", []):
        if isinstance(spec, dict):
            out.append((str(spec.get("host_ip", "0.0.0.0")), int(spec["published"]),
                        int(spec["target"])))
            continue
        spec = interpolate(str(spec)).split("/")[0]
        parts = spec.split(":")
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            out.append(("0.0.0.0", int(parts[0]), int(parts[1])))
        else:  # container port only: random host port
            continue
    return out


class Topology:
    """Roles of the services in a (merged) compose `services` mapping."""

    def __init__(self, services: dict):
        self.services = services
        self.superlinks = [n for n, s in services.items() if image_of(s).startswith("flwr/superlink:")]
        self.supernodes = sorted(
            (n for n, s in services.items() if image_of(s).startswith("flwr/supernode:")),
            key=lambda n: int(parse_node_config(flag(command(services[n]), "--node-config") or "")
                              .get("partition-id", -1)),
        )
        self.superexecs = [n for n, s in services.items() if "build" in s]
        assert len(self.superlinks) == 1, f"expected one SuperLink service, got {self.superlinks}"
        self.superlink = self.superlinks[0]
        sl_cmd = command(services[self.superlink])
        self.superlink_port = int(flag(sl_cmd, "--port") or 8000)

    def supernode_port(self, name: str) -> int:
        return int(flag(command(self.services[name]), "--port") or 9094)

    def superexec_for(self, address: str) -> list[str]:
        return [n for n in self.superexecs if runtime_address(command(self.services[n])) == address]


@pytest.fixture(scope="module")
def base() -> dict:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def overlay() -> dict:
    return load_yaml(OVERLAY)


@pytest.fixture(scope="module")
def topo(base) -> Topology:
    return Topology(base["services"])


@pytest.fixture(scope="module")
def tls_topo(base, overlay) -> Topology:
    return Topology(merge_services(base, overlay))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = DOCKERFILE.read_text()
    lines, buf = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        lines.append(buf + raw)
        buf = ""
    if buf:
        lines.append(buf)
    out = []
    for line in lines:
        instr, _, args = line.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def pyproject() -> dict:
    path = REPO / "pyproject.toml"
    assert path.is_file(), "pyproject.toml is missing at the repository root"
    return tomllib.loads(path.read_text())


def flwr_requirement() -> str:
    deps = pyproject()["project"]["dependencies"]
    flwr_deps = [d for d in deps if re.match(r"^flwr(\[[^\]]*\])?\s*[<>=!~ ]", d)]
    assert len(flwr_deps) == 1, f"expected one flwr requirement, got {flwr_deps}"
    return flwr_deps[0]


# ------------------------------------------------------------------- compose topology
def test_compose_files_parse_and_overlay_only_names_existing_services(base, overlay):
    assert base["services"], "compose.yml has no services"
    unknown = set(overlay["services"]) - set(base["services"])
    assert not unknown, f"with-tls.yml refers to services missing from compose.yml: {unknown}"
    for name in ("networks", "volumes", "secrets", "configs"):
        extra = set(overlay.get(name) or {}) - set(base.get(name) or {})
        # An overlay may add top-level objects, but then they must be used.
        for obj in extra:
            assert obj in OVERLAY.read_text(), obj


def test_topology_roles(topo, base):
    services = base["services"]
    n = len(topo.supernodes)
    assert n >= 2, f"expected several SuperNodes, got {topo.supernodes}"
    assert len(topo.superexecs) == n + 1, (
        f"expected one SuperExec per SuperNode plus one for the ServerApp, "
        f"got {topo.superexecs} for {n} SuperNodes"
    )
    roles = set(topo.superlinks) | set(topo.supernodes) | set(topo.superexecs)
    assert roles == set(services), f"services with no role: {set(services) - roles}"


def test_superlink_command(topo, base):
    cmd = command(base["services"][topo.superlink])
    assert has_flag(cmd, "--insecure"), "base compose.yml is the insecure variant"
    assert flag(cmd, "--isolation") == "process", "ServerApp must run in its own SuperExec"
    assert flag(cmd, "--host") == "0.0.0.0", "SuperLink must listen on all container interfaces"
    # Flower 1.41 rejects the old per-API address flags.
    for gone in ("--serverappio-api-address", "--fleet-api-address", "--control-api-address",
                 "--fleet-api-type"):
        assert not has_flag(cmd, gone), f"{gone} is removed/deprecated in flwr 1.41"
    # No run-time `uv sync` in a deployment whose image already has all dependencies.
    assert not has_flag(cmd, "--allow-runtime-dependency-installation")
    assert has_flag(cmd, "--disable-runtime-dependency-installation")


def test_supernode_partitions_are_0_to_n_minus_1(topo, base):
    n = len(topo.supernodes)
    ids, totals = [], set()
    for name in topo.supernodes:
        cfg = parse_node_config(flag(command(base["services"][name]), "--node-config") or "")
        assert set(cfg) >= {"partition-id", "num-partitions"}, f"{name}: node-config {cfg}"
        ids.append(int(cfg["partition-id"]))
        totals.add(int(cfg["num-partitions"]))
    assert sorted(ids) == list(range(n)), f"partition ids {sorted(ids)} != 0..{n - 1}"
    assert totals == {n}, f"num-partitions {totals} != {{{n}}}"


def test_supernode_commands(topo, base):
    for name in topo.supernodes:
        cmd = command(base["services"][name])
        assert has_flag(cmd, "--insecure"), name
        assert flag(cmd, "--superlink") == f"{topo.superlink}:{topo.superlink_port}", (
            f"{name} must reach the SuperLink's single 1.41 port"
        )
        assert flag(cmd, "--isolation") == "process", name
        assert flag(cmd, "--host") == "0.0.0.0", f"{name}: Runtime API must accept its SuperExec"
        assert not has_flag(cmd, "--clientappio-api-address"), "rejected by flwr 1.41"
        assert topo.supernode_port(name) != topo.superlink_port


def test_each_supernode_has_its_own_clientapp_superexec(topo, base):
    used = set()
    ports = [topo.supernode_port(n) for n in topo.supernodes]
    assert len(set(ports)) == len(ports), f"SuperNode Runtime API ports not unique: {ports}"
    for name in topo.supernodes:
        address = f"{name}:{topo.supernode_port(name)}"
        execs = topo.superexec_for(address)
        assert len(execs) == 1, f"{address} is served by SuperExecs {execs} (want exactly one)"
        svc = base["services"][execs[0]]
        assert has_flag(command(svc), "--insecure")
        deps = svc.get("depends_on", [])
        assert name in deps, f"{execs[0]} should depend on {name}"
        used.add(execs[0])
    server = topo.superexec_for(f"{topo.superlink}:{topo.superlink_port}")
    assert len(server) == 1, f"ServerApp SuperExec for the SuperLink: {server}"
    used.add(server[0])
    assert used == set(topo.superexecs), f"SuperExecs with a wrong address: {set(topo.superexecs) - used}"
    for name in topo.superexecs:
        cmd = command(base["services"][name])
        host, _ = split_hostport(runtime_address(cmd))
        assert host in base["services"], f"{name} points at unknown service {host}"
        plugin = flag(cmd, "--plugin-type")
        if plugin is not None:  # deprecated and ignored in 1.41, but must not lie
            want = "serverapp" if name in server else "clientapp"
            assert plugin == want, f"{name}: --plugin-type {plugin}"


def test_no_two_services_publish_the_same_host_port(base, overlay, topo):
    for services in (base["services"], merge_services(base, overlay)):
        seen: dict[tuple[str, int], str] = {}
        for name, svc in services.items():
            for ip, host_port, _ in published_ports(svc):
                for key in ((ip, host_port), ("0.0.0.0", host_port)):
                    other = seen.get(key)
                    assert other in (None, name), f"host port {host_port} published by {other} and {name}"
                seen[(ip, host_port)] = name
                seen.setdefault(("0.0.0.0", host_port), name)
    targets = [t for _, _, t in published_ports(base["services"][topo.superlink])]
    assert topo.superlink_port in targets, "the SuperLink port must be published for the flwr CLI"
    for name in topo.supernodes + topo.superexecs:
        assert not published_ports(base["services"][name]), f"{name} should not publish ports"


def test_flwr_images_match_dockerfile_and_flwr_pin(base):
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    import flwr

    instr = dockerfile_instructions()
    from_lines = [a for i, a in instr if i == "FROM"]
    assert len(from_lines) == 1, from_lines
    # `FROM ${BASE_IMAGE}` with `ARG BASE_IMAGE=flwr/superexec:x.y.z` before it: the
    # default (what a normal Docker host builds) must be the official image.
    pre_from = instr[: [i for i, _ in instr].index("FROM")]
    defaults = dict(a.split("=", 1) for i, a in pre_from if i == "ARG" and "=" in a)
    base_image = re.sub(r"\$\{?(\w+)\}?", lambda v: defaults.get(v.group(1), v.group(0)), from_lines[0])
    m = re.fullmatch(r"flwr/superexec:(\d+\.\d+\.\d+)(-py[\d.]+-\w+[\d.]+)?(\s+AS\s+\S+)?",
                     base_image, flags=re.I)
    assert m, f"Dockerfile must build FROM flwr/superexec:<x.y.z> by default, got {from_lines[0]!r}"
    version = m.group(1)
    assert version.startswith("1.41."), version
    tags = {image_of(s).split(":", 1)[1] for s in base["services"].values()
            if image_of(s).startswith("flwr/")}
    assert tags == {version}, f"flwr image tags {tags} differ from the Dockerfile's {version}"

    req = flwr_requirement()
    spec = SpecifierSet(re.sub(r"^flwr(\[[^\]]*\])?", "", req).strip())
    assert Version(version) in spec, f"image flwr {version} does not satisfy {req!r}"
    installed = Version(flwr.__version__)
    assert (installed.major, installed.minor) == Version(version).release[:2], (
        f"installed flwr {installed} vs images {version}"
    )


def test_build_contexts_and_dockerfiles_exist(base, topo):
    for name in topo.superexecs:
        build = base["services"][name]["build"]
        if isinstance(build, str):
            build = {"context": build}
        context = host_path(interpolate(build.get("context", ".")))
        assert context == REPO, f"{name}: build context {context} should be the repository root"
        dockerfile = (context / interpolate(build.get("dockerfile", "Dockerfile"))).resolve()
        assert dockerfile == DOCKERFILE, f"{name}: dockerfile {dockerfile}"
        assert "dockerfile_inline" not in build


# --------------------------------------------------------------------------- Dockerfile
def _copy_sources() -> list[str]:
    sources = []
    for instr, args in dockerfile_instructions():
        if instr in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            assert len(parts) >= 2, args
            sources += parts[:-1]
    return sources


def _local_imports(paths: list[Path]) -> set[str]:
    names = set()
    for path in paths:
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except SyntaxError as err:  # someone else's file in progress
            pytest.fail(f"cannot parse {path}: {err}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_dockerfile_installs_cpu_torch_and_the_project():
    instr = dockerfile_instructions()
    # every `pip install` command, one per `&&`/`;`-separated shell segment
    installs = [seg.strip() for i, a in instr if i == "RUN"
                for seg in re.split(r"&&|;", a) if re.search(r"\bpip install\b", seg)]
    args = {a.split("=", 1)[0].split()[0]: a.split("=", 1)[1] for i, a in instr
            if i == "ARG" and "=" in a}
    cpu_index = "https://download.pytorch.org/whl/cpu"
    torch_runs = [r for r in installs
                  if cpu_index in r or ("TORCH_INDEX_URL" in r and args.get("TORCH_INDEX_URL") == cpu_index)]
    assert torch_runs, "torch must come from the PyTorch CPU wheel index"
    project_install = [r for r in installs if re.search(r"pip install (--?\S+ )*\.(\s|$)", r)]
    assert project_install, "the Dockerfile must `pip install .` the project"
    assert not any(re.search(r"\s(-e|--editable)\s", r) for r in project_install), (
        "no editable install: the source folder is removed after installing"
    )
    # torch must be installed before the project, or pip pulls the CUDA wheels.
    assert installs.index(torch_runs[0]) < installs.index(project_install[-1])
    entry = [a for i, a in instr if i == "ENTRYPOINT"]
    assert entry and "flower-superexec" in entry[-1]


def _app_requirements() -> list[str]:
    """What the image must hold: the library's and the reference app's requirements."""
    project = pyproject()["project"]
    deps = project["dependencies"] + project.get("optional-dependencies", {}).get("app", [])
    return list(dict.fromkeys(d.replace("flwr[simulation]", "flwr") for d in deps))


def _req_name(req: str) -> str:
    return re.split(r"[^A-Za-z0-9_.-]", req, maxsplit=1)[0].lower()


@pytest.mark.parametrize("omit", ["", "torchvision"])
def test_dockerfile_requirements_follow_pyproject(tmp_path, omit):
    """Run the RUN line that installs the dependencies (pip replaced by echo) on the real pyproject."""
    runs = [a for i, a in dockerfile_instructions() if i == "RUN" and "TORCH_INDEX_URL" in a]
    assert len(runs) == 1, runs
    cmd = re.sub(r"/tmp/([\w.-]+\.txt)", lambda m: str(tmp_path / m.group(1)), runs[0])
    cmd = re.sub(r"python -m pip install", "echo pip install", cmd)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    env = dict(os.environ, TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu", OMIT_PACKAGES=omit,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run(["sh", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "--index-url https://download.pytorch.org/whl/cpu" in res.stdout
    want = [d for d in _app_requirements() if _req_name(d) not in omit.split()]
    torch_reqs = (tmp_path / "torch-requirements.txt").read_text().splitlines()
    rest = (tmp_path / "requirements.txt").read_text().splitlines()
    # torch first from the CPU index, then everything else with torch pinned to that build
    assert torch_reqs == [d for d in want if _req_name(d) in ("torch", "torchvision")], torch_reqs
    assert rest == [d for d in want if _req_name(d) not in ("torch", "torchvision")], rest
    assert any(_req_name(d) == "torch" for d in torch_reqs), torch_reqs
    assert not any("[simulation]" in d for d in rest), "Ray is not needed in the deployment image"
    assert (tmp_path / "constraints.txt").read_text().startswith("torch=="), "torch is not pinned"
    if omit:
        assert not any(_req_name(d) == omit for d in torch_reqs + rest)


def test_dockerfile_copies_everything_the_apps_import():
    sources = _copy_sources()
    assert "pyproject.toml" in sources
    for src in sources:
        if any(ch in src for ch in "*?["):
            continue
        assert (REPO / src).exists(), f"COPY source {src!r} does not exist at the repository root"
    copied = {s.rstrip("/") for s in sources}
    comps = pyproject()["tool"]["flwr"]["app"]["components"]
    todo = {v.split(":")[0].split(".")[0] for v in comps.values()}
    seen: set[str] = set()
    while todo:  # follow local imports transitively
        pkg = todo.pop()
        seen.add(pkg)
        assert pkg in copied or f"{pkg}.py" in copied, f"package {pkg!r} is used but not COPYed"
        root = REPO / pkg
        files = list(root.rglob("*.py")) if root.is_dir() else [REPO / f"{pkg}.py"]
        for name in _local_imports(files):
            if name not in seen and ((REPO / name).is_dir() or (REPO / f"{name}.py").is_file()):
                if name not in ("tests", "docker"):
                    todo.add(name)
    setuptools_pkgs = pyproject().get("tool", {}).get("setuptools", {}).get("packages", [])
    for pkg in setuptools_pkgs if isinstance(setuptools_pkgs, list) else []:
        assert pkg.split(".")[0] in copied, f"pyproject package {pkg!r} is not COPYed"
    readme = pyproject()["project"].get("readme")
    if isinstance(readme, str):
        assert any(fnmatch.fnmatch(readme, s) for s in sources), f"readme {readme!r} not COPYed"


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker-style: the last matching pattern wins; a pattern matching a parent counts."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.strip("/")
        alts = {pat, pat[3:]} if pat.startswith("**/") else {pat}
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in alts):
            excluded = not neg
    return excluded


def test_dockerignore_keeps_sources_and_drops_secrets():
    assert DOCKERIGNORE.is_file(), "BuildKit uses docker/Dockerfile.dockerignore for this build"
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    for src in _copy_sources():
        if any(ch in src for ch in "*?["):
            continue
        assert not _dockerignore_excludes(src, patterns), f"{src} is excluded from the context"
        if (REPO / src).is_dir():
            assert not _dockerignore_excludes(f"{src}/module.py", patterns), src
            assert _dockerignore_excludes(f"{src}/__pycache__/x.pyc", patterns), src
    for secret in (".venv/bin/python", ".git/config", "docker/certs/server.key",
                   "docker/keys/supernode-0", "docker/data/x.gz", "outputs/r/results.json"):
        assert _dockerignore_excludes(secret, patterns), f"{secret} would be in the build context"


# ------------------------------------------------------------------- mounts and overlay
def test_bind_mounts_exist_or_are_generated(base, overlay):
    declared = set(base.get("volumes") or {}) | set(overlay.get("volumes") or {})
    for label, services in (("compose.yml", base["services"]),
                            ("with-tls.yml", overlay["services"])):
        for name, svc in services.items():
            for m in mounts(svc).values():
                if m["type"] == "volume":
                    assert m["source"] in declared, f"{label}/{name}: undeclared volume {m}"
                    continue
                src = host_path(m["source"])
                rel = src.relative_to(DOCKER) if src.is_relative_to(DOCKER) else None
                if rel is not None and rel.parts and rel.parts[0] in GENERATED_DIRS:
                    # produced by generate_certs.sh (checked there); never create it
                    assert m["create_host_path"] is False, (
                        f"{label}/{name}: {m['source']} must not be auto-created as a folder"
                    )
                    assert m["read_only"], f"{label}/{name}: {m['source']} should be read-only"
                    continue
                assert src.exists(), f"{label}/{name}: bind source {src} does not exist"


def test_superexecs_mount_the_data_folder_read_only(topo, base):
    for name in topo.superexecs:
        data = mounts(base["services"][name]).get("/app/data")
        assert data is not None, f"{name} has no /app/data mount"
        assert data["read_only"], f"{name}: /app/data must be read-only"


def test_gitignore_keeps_generated_secrets_out_of_git():
    lines = {ln.strip() for ln in (DOCKER / ".gitignore").read_text().splitlines()}
    for d in GENERATED_DIRS:
        assert {d, f"{d}/", f"/{d}/", f"/{d}"} & lines, f"docker/.gitignore must ignore {d}/"


def test_tls_overlay_flags(tls_topo, topo, base, overlay):
    s = tls_topo.services
    assert tls_topo.supernodes == topo.supernodes
    sl = command(s[tls_topo.superlink])
    sl_mounts = mounts(s[tls_topo.superlink])
    assert not has_flag(sl, "--insecure")
    for f in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert flag(sl, f) in sl_mounts, f"SuperLink {f} {flag(sl, f)} is not mounted"
    assert has_flag(sl, "--enable-supernode-auth")
    assert flag(sl, "--isolation") == "process"
    assert tls_topo.superlink_port == topo.superlink_port
    for name in topo.supernodes:
        cmd, m = command(s[name]), mounts(s[name])
        assert name in overlay["services"], f"{name} is not covered by the TLS overlay"
        assert not has_flag(cmd, "--insecure"), name
        assert flag(cmd, "--root-certificates") in m, name
        key = flag(cmd, "--auth-supernode-private-key")
        assert key in m, f"{name}: private key {key} is not mounted"
        assert Path(m[key]["source"]).name == name, f"{name} uses key {m[key]['source']}"
        # everything else is unchanged from compose.yml
        base_cmd = command(base["services"][name])
        for f in ("--superlink", "--node-config", "--port", "--host", "--isolation"):
            assert flag(cmd, f) == flag(base_cmd, f), f"{name}: {f} differs from compose.yml"
    # SuperLink clients (the ServerApp SuperExec) must now speak TLS
    for name in tls_topo.superexec_for(f"{tls_topo.superlink}:{tls_topo.superlink_port}"):
        cmd = command(s[name])
        assert not has_flag(cmd, "--insecure"), f"{name}: the SuperLink Runtime API is HTTPS now"
        assert flag(cmd, "--root-certificates") in mounts(s[name]), name
    keys = [Path(mounts(s[n])[flag(command(s[n]), "--auth-supernode-private-key")]["source"]).name
            for n in topo.supernodes]
    assert len(set(keys)) == len(keys), f"SuperNodes share auth keys: {keys}"


def test_edge_overlay_caps_every_client(topo):
    """docker/edge.yml: every SuperNode and its ClientApp SuperExec get a CPU and memory cap."""
    edge = load_yaml(DOCKER / "edge.yml")["services"]
    clients = set(topo.supernodes) | {n for n in topo.superexecs
                                      if runtime_address(command(topo.services[n])).split(":")[0]
                                      in topo.supernodes}
    assert set(edge) == clients, f"edge.yml covers {sorted(edge)}, clients are {sorted(clients)}"
    for name, svc in edge.items():
        assert float(interpolate(str(svc["cpus"]))) > 0, name
        assert re.fullmatch(r"\d+[kmg]", interpolate(str(svc["mem_limit"]))), name
        assert svc["environment"]["OMP_NUM_THREADS"], name
    assert topo.superlink not in edge


def test_readme_matches_the_compose_files(topo):
    readme = (DOCKER / "README.md").read_text()
    assert "docker compose -f docker/compose.yml up --build -d" in readme
    assert "docker compose -f docker/compose.yml -f docker/with-tls.yml up --build -d" in readme
    host_ports = [h for _, h, t in published_ports(topo.services[topo.superlink])
                  if t == topo.superlink_port]
    assert host_ports, "SuperLink port not published"
    assert f'address = "127.0.0.1:{host_ports[0]}"' in readme, "README connection entry"
    assert "insecure = true" in readme and "root-certificates" in readme
    assert "flwr supernode register" in readme and "generate_certs.sh" in readme
    assert "data-dir='/app/data'" in readme
    assert "docker build -f docker/Dockerfile" in readme


# -------------------------------------------------------------------- generate_certs.sh
needs_tools = pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("ssh-keygen") and shutil.which("bash")),
    reason="openssl, ssh-keygen and bash are needed to run generate_certs.sh",
)


def run_generate(out: Path, n: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GEN_SCRIPT), str(out), str(n)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def generated(tmp_path_factory, topo) -> Path:
    if not (shutil.which("openssl") and shutil.which("ssh-keygen")):
        pytest.skip("openssl and ssh-keygen are needed to run generate_certs.sh")
    out = tmp_path_factory.mktemp("generated")
    res = run_generate(out, len(topo.supernodes))
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def test_generate_certs_script_is_strict_bash():
    text = GEN_SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash") or text.startswith("#!/bin/bash")
    assert "set -euo pipefail" in text
    assert os.access(GEN_SCRIPT, os.X_OK), "generate_certs.sh should be executable"


@needs_tools
def test_generate_certs_rejects_a_bad_node_count(tmp_path):
    res = run_generate(tmp_path / "x", 0)
    assert res.returncode != 0
    assert not (tmp_path / "x" / "keys").exists()


@needs_tools
def test_generated_files_cover_every_overlay_mount(generated, overlay):
    for name, svc in overlay["services"].items():
        for m in mounts(svc).values():
            if m["type"] != "bind":
                continue
            rel = host_path(m["source"]).relative_to(DOCKER)
            if rel.parts[0] in GENERATED_DIRS:
                assert (generated / rel).is_file(), f"{name}: {rel} is not produced by generate_certs.sh"


@needs_tools
def test_generated_certificate_is_valid_for_the_superlink(generated, tls_topo):
    ca, cert = generated / "certs" / "ca.crt", generated / "certs" / "server.pem"
    res = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(cert)],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    san = text.split("Subject Alternative Name:", 1)[1].splitlines()[1]
    assert "IP Address:127.0.0.1" in san, san
    assert "DNS:localhost" in san, san
    # every name under which a container reaches the SuperLink
    hosts = {split_hostport(flag(command(tls_topo.services[n]), "--superlink"))[0]
             for n in tls_topo.supernodes}
    hosts |= {split_hostport(runtime_address(command(tls_topo.services[n])))[0]
              for n in tls_topo.superexec_for(f"{tls_topo.superlink}:{tls_topo.superlink_port}")}
    for host in hosts:
        assert f"DNS:{host}" in san, f"certificate SANs {san} lack {host}"
    key = subprocess.run(["openssl", "pkey", "-in", str(generated / "certs" / "server.key"),
                          "-pubout"], capture_output=True, text=True, check=True).stdout
    cert_key = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-pubkey"],
                              capture_output=True, text=True, check=True).stdout
    assert key == cert_key, "server.key does not belong to server.pem"


@needs_tools
def test_generated_supernode_keys(generated, topo):
    n = len(topo.supernodes)
    keys = sorted(p.name for p in (generated / "keys").iterdir())
    assert keys == sorted([f"supernode-{i}" for i in range(n)] + [f"supernode-{i}.pub" for i in range(n)])
    pubs = set()
    for i in range(n):
        pub = (generated / "keys" / f"supernode-{i}.pub").read_text().split()
        assert pub[0] == "ecdsa-sha2-nistp384", pub[0]
        pubs.add(pub[1])
        priv = generated / "keys" / f"supernode-{i}"
        assert "OPENSSH PRIVATE KEY" in priv.read_text()
        assert priv.stat().st_mode & 0o077 == 0, "private keys must not be group/world readable"
    assert len(pubs) == n, "key pairs are not distinct"


@needs_tools
def test_generate_certs_overwrites(generated, tmp_path):
    before = (generated / "certs" / "ca.crt").read_bytes()
    out = tmp_path / "again"
    shutil.copytree(generated, out)
    res = run_generate(out, 1)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (out / "certs" / "ca.crt").read_bytes() != before


# ------------------------------------------------ slow: the compose commands for real
TINY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "dockercheck"
version = "1.0.0"
description = "Checks the docker/ compose commands"
license = "Apache-2.0"
dependencies = ["flwr"]

[tool.flwr.app]
publisher = "autoflip"

[tool.flwr.app.components]
serverapp = "dockercheck.server:app"
clientapp = "dockercheck.client:app"

[tool.flwr.app.config]
num-server-rounds = 1
"""

TINY_CLIENT = """\
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    pid = int(context.node_config["partition-id"])
    n = int(context.node_config["num-partitions"])
    metrics = MetricRecord({"num-examples": 1, f"pid-{pid}-of-{n}": 1})
    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)
"""

TINY_SERVER = """\
import os

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context):
    n = int(os.environ["DOCKERCHECK_NODES"])
    nodes = []
    for _ in range(300):
        nodes = list(grid.get_node_ids())
        if len(nodes) >= n:
            break
        import time
        time.sleep(0.2)
    content = RecordDict({"arrays": ArrayRecord([np.ones(2)]), "config": ConfigRecord({})})
    msgs = [Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]
    seen = []
    for reply in grid.send_and_receive(msgs, timeout=120):
        if reply.has_content():
            seen += [k for k in reply.content["metrics"] if k.startswith("pid-")]
    with open(os.environ["DOCKERCHECK_RESULT"], "w") as f:
        f.write("\\n".join(sorted(seen)))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, procs, timeout: float = 30.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        for p in procs:
            assert p.poll() is None, f"{p.args[0]} exited early with {p.returncode}"
        time.sleep(0.2)
    pytest.fail(f"nothing listens on 127.0.0.1:{port}")


def _localize(topo: Topology, name: str, portmap: dict[str, int], files: dict[str, Path]) -> list[str]:
    """The service's command with compose service names, ports and container paths
    replaced by 127.0.0.1, free local ports and host files."""
    cmd = list(command(topo.services[name]))
    m = mounts(topo.services[name])
    out = []
    for i, tok in enumerate(cmd):
        prev = cmd[i - 1] if i else ""
        if prev == "--host":
            tok = "127.0.0.1"
        elif prev == "--port":
            tok = str(portmap[name])
        elif prev in ("--superlink", "--runtime-api-address", "--appio-api-address"):
            host, _ = split_hostport(tok)
            tok = f"127.0.0.1:{portmap[host]}"
        elif tok in m and m[tok]["type"] == "bind":
            rel = host_path(m[tok]["source"]).relative_to(DOCKER)
            tok = str(files["root"] / rel)
        out.append(tok)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["insecure", "tls"])
def test_compose_commands_run_a_flower_app(variant, base, overlay, tmp_path, generated):
    """Start every compose service's command as a local process and run a tiny app."""
    services = base["services"] if variant == "insecure" else merge_services(base, overlay)
    topo = Topology(services)
    bindir = Path(sys.executable).parent
    binaries = {"flwr/superlink": "flower-superlink", "flwr/supernode": "flower-supernode"}
    app = tmp_path / "app"
    (app / "dockercheck").mkdir(parents=True)
    (app / "pyproject.toml").write_text(TINY_PYPROJECT)
    (app / "dockercheck" / "__init__.py").write_text("")
    (app / "dockercheck" / "client.py").write_text(TINY_CLIENT)
    (app / "dockercheck" / "server.py").write_text(TINY_SERVER)
    home = tmp_path / "flwr_home"
    home.mkdir()
    result = tmp_path / "result.txt"
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
               DOCKERCHECK_RESULT=str(result), DOCKERCHECK_NODES=str(len(topo.supernodes)))
    portmap = {name: _free_port() for name in [topo.superlink, *topo.supernodes]}
    files = {"root": generated}
    conn = f'address = "127.0.0.1:{portmap[topo.superlink]}"\n'
    conn += ('insecure = true\n' if variant == "insecure"
             else f'root-certificates = "{generated / "certs" / "ca.crt"}"\n')
    (home / "config.toml").write_text(f"[superlink]\ndefault = \"c\"\n\n[superlink.c]\n{conn}")

    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str) -> None:
        image = image_of(topo.services[name]).split(":")[0]
        exe = binaries.get(image, "flower-superexec")
        log = open(logs / f"{name}.log", "w")
        procs.append(subprocess.Popen([str(bindir / exe), *_localize(topo, name, portmap, files)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path))

    def flwr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(bindir / "flwr"), *args], env=env, capture_output=True,
                              text=True, timeout=180, cwd=tmp_path)

    try:
        start(topo.superlink)
        _wait_port(portmap[topo.superlink], procs)
        if has_flag(command(services[topo.superlink]), "--enable-supernode-auth"):
            for name in topo.supernodes:
                key = _localize(topo, name, portmap, files)
                pub = key[key.index("--auth-supernode-private-key") + 1] + ".pub"
                res = flwr("supernode", "register", pub, "c")
                assert res.returncode == 0, res.stdout + res.stderr
        for name in topo.supernodes:
            start(name)
        for name in topo.supernodes:
            _wait_port(portmap[name], procs)
        for name in topo.superexecs:
            start(name)
        res = flwr("run", str(app), "c")  # returns once the run is submitted
        assert res.returncode == 0, res.stdout + res.stderr
        deadline = time.time() + 180
        while not result.exists() and time.time() < deadline:
            time.sleep(0.5)
        n = len(topo.supernodes)
        assert result.exists(), res.stdout + "".join(
            f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in logs.iterdir())
        assert result.read_text().split() == [f"pid-{i}-of-{n}" for i in range(n)]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
