"""The deployment files, checked without Docker or a cluster.

docker-compose.yml is validated with Debian's ``docker-compose config`` (the
old Python compose, which parses and checks a file without an engine), run on
a Docker engine by tests/test_docker_compose.py, and run, service by service,
in network namespaces by tests/test_compose_topology.py.  The Kubernetes manifests are validated
against the Kubernetes API schemas that kubernetes-validate ships (offline).
The topology checks here tie the compose file to what the demo and the
namespace tests assume, so the three cannot drift apart.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from netns import ComposeService, load_compose

from cli.demo import CLIENT_SERVICE, SEEDS, layout
from gossip.keyring import generate_key
from simulations.harness import ROOT

COMPOSE = ROOT / "docker-compose.yml"
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))


def compose_services() -> dict[str, ComposeService]:
    return load_compose(COMPOSE, {"MESH_CLUSTER_KEY": generate_key()})


def docker_compose(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; .ci/run does)")
    # An empty env file instead of ./.env, so a developer's real key never decides the outcome.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    return subprocess.run([exe, "-f", str(COMPOSE), "--env-file", str(empty), *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "COMPOSE_", "DOCKER_"))}
    return {**env, **extra}


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    env = clean_env(MESH_CLUSTER_KEY=generate_key())
    p = docker_compose(tmp_path, "config", env=env)
    assert p.returncode == 0, p.stderr
    resolved = yaml.safe_load(p.stdout)
    assert set(resolved["services"]) == set(compose_services())
    # The key reaches every agent from the environment (.env), and nothing else holds one.
    for name, svc in resolved["services"].items():
        if "network_mode" not in svc:
            assert svc["environment"]["MESH_KEY"] == env["MESH_CLUSTER_KEY"], name


def test_docker_compose_config_without_a_key_says_how_to_make_one(tmp_path: Path) -> None:
    p = docker_compose(tmp_path, "config", env=clean_env())
    assert p.returncode != 0
    assert "make cluster-key" in p.stderr


def test_no_cluster_key_is_committed() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^MESH_CLUSTER_KEY=\s*$", example, re.M), "the example must not hold a real key"
    text = COMPOSE.read_text() + "".join(m.read_text() for m in MANIFESTS)
    assert not re.search(r"[A-Za-z0-9+/]{43}=", text), "something that looks like a key is committed"


def test_compose_topology_is_the_demo_s() -> None:
    services = compose_services()
    agents = [s for s in services.values() if s.is_agent]
    assert [a.name for a in agents] == [f"agent{i}" for i in range(1, 6)]
    seeds = [f"agent{i}:7946" for i in range(1, SEEDS + 1)]
    for a in agents:
        assert a.command == ["agent"]
        assert a.environment["MESH_NAME"] == a.name
        # Through the seeds; a seed through the others, never itself.
        assert a.environment["MESH_JOIN"].split(",") == [s for s in seeds if s != f"{a.name}:7946"]
    # The demo services: `make demo` (cli/demo.py) places them on node i exactly as compose on agent i.
    placed = {}
    for s in services.values():
        if s.command[:1] == ["demo-service"]:
            args = s.command
            iid, service = args[args.index("--id") + 1], args[args.index("--register") + 1]
            placed[iid] = (service, s.network_of)
    assert placed == {i.id: (i.service, f"agent{i.node_index + 1}") for i in layout(5)}
    assert sum(1 for svc, _ in placed.values() if svc == "web") == 3
    assert sum(1 for svc, _ in placed.values() if svc == "api") == 2
    (client,) = [s for s in services.values() if s.command[:1] == ["demo-client"]]
    assert client.network_of == "agent5"
    assert client.command[client.command.index("--upstream") + 1] == CLIENT_SERVICE
    # Sidecars wait for their agent to be healthy.
    for s in services.values():
        if not s.is_agent:
            assert s.depends_on == [s.network_of], s.name


def test_the_dockerfile_runs_the_agent_as_a_non_root_user_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    # The official slim image by default; another base only when asked for (docker/build-offline.sh).
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim$", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert 'ENTRYPOINT ["mesh-agent"]' in text and 'CMD ["agent"]' in text
    check = re.search(r"^HEALTHCHECK .*\n?.*/v1/health.*", text, re.M)
    assert check and "python" not in check.group(0), "a health check every 10 s must not start an interpreter"


def test_the_docker_build_context_holds_the_whole_package() -> None:
    """What .dockerignore lets into the build is what pyproject.toml installs (no engine needed to check)."""
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*", "the context starts empty and names what it needs"
    kept = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"], *project["tool"]["setuptools"]["packages"]}
    assert needed <= kept, f"missing from the build context: {sorted(needed - kept)}"


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifests_match_the_api_schemas(manifest: Path) -> None:
    exe = Path(sys.executable).parent / "kubernetes-validate"
    p = subprocess.run([str(exe), "--strict", str(manifest)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "passed" in p.stdout


def test_kubernetes_deployment_has_what_the_issue_asks() -> None:
    docs = [d for m in MANIFESTS for d in yaml.safe_load_all(m.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert {"Namespace", "Service", "DaemonSet"} <= set(kinds)
    seeds = kinds["Service"]
    assert seeds["spec"]["clusterIP"] == "None" and seeds["spec"]["publishNotReadyAddresses"] is True
    pod = kinds["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert seeds["spec"]["selector"].items() <= kinds["DaemonSet"]["spec"]["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MESH_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mesh-cluster-key"
    assert env["MESH_SEEDS"]["value"].startswith(seeds["metadata"]["name"] + ".")
    assert {p["containerPort"] for p in container["ports"]} == {7946, 7948}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/health"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_daemonset_joins_through_other_agents_the_seed_name_lists(tmp_path: Path) -> None:
    """The pod's start script, run with a stand-in getent: other agents only, and a fallback."""
    (ds,) = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/daemonset.yaml").read_text())]
    container = ds["spec"]["template"]["spec"]["containers"][0]
    script = container["args"][0].replace("exec mesh-agent agent", 'echo "$MESH_JOIN"')
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "getent").write_text("#!/bin/sh\n[ \"$2\" = seeds.test ] && printf '%s\\n' "
                                 "'10.0.0.1        STREAM seeds.test' '10.0.0.2        STREAM' "
                                 "'10.0.0.3        STREAM'\nexit 0\n")
    (fake / "getent").chmod(0o755)

    def run(seeds: str) -> str:
        env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", MESH_SEEDS=seeds, HOST_IP="10.0.0.2")
        p = subprocess.run([*container["command"], script], capture_output=True, text=True, env=env, timeout=30)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    assert sorted(run("seeds.test").split(",")) == ["10.0.0.1:7946", "10.0.0.3:7946"]
    assert run("unknown.test") == "unknown.test:7946"
